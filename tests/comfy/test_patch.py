"""patch (DistriFusion) in ComfyUI: the Multi-GPU KSampler on tiny DiTs of ComfyUI's own classes
(fixture_nodes/families.py) and on the tiny SD1.x / SDXL checkpoints, its latent in two bands over two CPU workers.
With warm-up covering every step it gives the stock KSampler's latents; after one exact step the other band's
keys and values (and, in a UNet, its halos and GroupNorm sums) are one step stale: close to stock (a PSNR floor),
not equal. The Settings node offers it through the strategy registry."""

from __future__ import annotations

import pytest

STEPS = 4
PSNR_FLOOR_DB = 30.0
FAMILIES = {"flux": "Flux", "wan21_t2v": "WAN21_T2V"}  # family: the comfy.supported_models class it needs


def _pair(server, comfy, host_families, name: str, family: str, warmup: int, cfg: float):
    if family not in host_families:
        pytest.skip(f"this ComfyUI has no comfy.supported_models.{FAMILIES[family]} ({family})")
    stock, tandem = comfy.run_pair(server, name, "patch", kind="family", family=family, steps=STEPS, cfg=cfg,
                                   degrees={"warmup": warmup})
    assert server.get("/tandem/status")["last_run"]["strategy"] == "patch"
    return stock, tandem


def test_the_settings_node_offers_patch_and_its_degree(comfy_server):
    inputs = comfy_server.get("/object_info/TandemSettings")["TandemSettings"]["input"]
    kind, *details = inputs["required"]["strategy"]  # ["COMBO", {"options": [...]}], or [[...], {...}] before
    options = details[0]["options"] if kind == "COMBO" else kind
    assert "patch" in options
    assert "patch" in {**inputs.get("optional", {}), **inputs["required"]}


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_warm_up_covering_every_step_equals_stock(comfy_server, comfy, host_families, family, cfg):
    stock, tandem = _pair(comfy_server, comfy, host_families, f"patch_exact_{family}_{cfg:g}", family, STEPS, cfg)
    comfy.assert_same_latents(tandem, stock)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_after_warm_up_the_bands_are_stale_within_the_psnr_floor(comfy_server, comfy, host_families, family):
    from parallel_backend.engine.oracle import psnr

    stock, tandem = _pair(comfy_server, comfy, host_families, f"patch_stale_{family}", family, 1, 1.0)
    assert (tandem - stock).abs().max() > comfy.RTOL_OF_SCALE * stock.abs().max()  # stale values were used
    assert psnr(stock, tandem) >= PSNR_FLOOR_DB, psnr(stock, tandem)


@pytest.mark.parametrize("cfg, family", [(6.0, "sd1"), (1.0, "sdxl")])
def test_a_unet_with_warm_up_covering_every_step_equals_stock(comfy_server, comfy, cfg, family):
    """The tiny SD1.x / SDXL checkpoints through the Multi-GPU KSampler in two bands of latent rows."""
    stock, tandem = comfy.run_pair(comfy_server, f"patch_unet_exact_{family}_{int(cfg)}", "patch", cfg=cfg,
                                   family=family, size=128, settings={"warmup": 6, "cfg_degree": 1, "patch": 2})
    comfy.assert_same_latents(tandem, stock)
    assert comfy_server.get("/tandem/status")["last_run"]["strategy"] == "patch"


def test_a_unet_after_warm_up_is_stale_within_the_psnr_floor(comfy_server, comfy):
    from parallel_backend.engine.oracle import psnr

    stock, tandem = comfy.run_pair(comfy_server, "patch_unet_stale", "patch", size=128,
                                   settings={"warmup": 1, "cfg_degree": 1, "patch": 2})
    assert (tandem - stock).abs().max() > comfy.RTOL_OF_SCALE * stock.abs().max()  # stale values were used
    assert psnr(stock, tandem) >= PSNR_FLOOR_DB, psnr(stock, tandem)
