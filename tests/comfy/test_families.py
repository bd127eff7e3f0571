"""Every ComfyUI model family on the pool: the Multi-GPU KSampler gives the stock KSampler's latents.

Tiny models of each DiT and video family (fixture_nodes/families.py: ComfyUI's own classes, the family's block
structure, seeded weights); Flux, SD3 and Wan 2.1 also as files loaded by ComfyUI's UNETLoader (write_families.py).
Video families sample several latent frames. A family whose model class this host lacks is skipped, naming it.
"""

from __future__ import annotations

import pytest

STEPS = 3

# family: the comfy.supported_models class it needs (for the skip reason)
FAMILY_CLASSES = {
    "flux": "Flux", "flux_schnell": "FluxSchnell", "flux2": "Flux2", "chroma": "Chroma", "zimage": "ZImage",
    "sd3": "SD3", "sd35": "SD3", "qwen_image": "QwenImage", "wan21_t2v": "WAN21_T2V", "wan21_i2v": "WAN21_I2V",
    "wan22_i2v": "WAN21_T2V", "wan22_5b": "WAN22_T2V", "hunyuan_video": "HunyuanVideo",
    "hunyuan_video15": "HunyuanVideo15", "ltxv": "LTXV", "aura_flow": "AuraFlow",
}
# Families the core declares it cannot split: their Multi-GPU run must say so and still equal stock.
STOCK_PATH_FAMILIES = {"aura_flow": "Tandem has no adapter for this model family (MMDiT); it splits"}


def _need(family: str, host_families) -> None:
    if family not in host_families:
        pytest.skip(f"this ComfyUI has no comfy.supported_models.{FAMILY_CLASSES[family]} ({family})")


def _need_file(family: str, comfy_base, comfy) -> None:
    skip = comfy_base / "models" / "diffusion_models" / (comfy.FAMILY_FILES[family] + ".skip")
    if skip.exists():
        pytest.skip(skip.read_text())


def check_family(server, comfy, name: str, family: str, strategy: str, **kw) -> None:
    """Stock vs Multi-GPU on the family; for a family declared unsupported, the stock-path sentence instead of
    the pool's run count."""
    kw = dict(family=family, steps=STEPS, **kw)
    if family not in STOCK_PATH_FAMILIES:
        stock, tandem = comfy.run_pair(server, name, strategy, kind="family", **kw)
    else:
        comfy.run_checked(server, comfy.family_workflow("KSampler", f"{name}_stock", None, **kw))
        log_before = server.log_size()
        comfy.run_checked(server, comfy.family_workflow("TandemKSampler", f"{name}_tandem", strategy, **kw))
        said = server.log_since(log_before)
        assert f"using the stock sampling path: {STOCK_PATH_FAMILIES[family]}" in said, said[-2000:]
        stock, tandem = server.latent(f"{name}_stock"), server.latent(f"{name}_tandem")
    assert stock.shape[0] == kw.get("batch", 1)
    comfy.assert_same_latents(tandem, stock)


STRATEGIES = [("cfg", 4.0, 1), ("batch", 1.0, 2), ("batch", 4.0, 2)]  # batch: at cfg 1 and with both branches


@pytest.mark.parametrize("strategy, cfg, batch", STRATEGIES)
@pytest.mark.parametrize("family", list(FAMILY_CLASSES))
def test_family_on_the_pool_equals_stock(comfy_server, comfy, host_families, family, strategy, cfg, batch):
    _need(family, host_families)
    check_family(comfy_server, comfy, f"fam_{family}_{strategy}", family, strategy, cfg=cfg, batch=batch)


@pytest.mark.parametrize("strategy, cfg, batch", STRATEGIES)
@pytest.mark.parametrize("family", ["flux", "sd3", "wan21_t2v"])
def test_family_file_loaded_by_unet_loader_equals_stock(comfy_server, comfy_base, comfy, host_families, family,
                                                        strategy, cfg, batch):
    _need(family, host_families)
    _need_file(family, comfy_base, comfy)
    check_family(comfy_server, comfy, f"file_{family}_{strategy}", family, strategy, cfg=cfg, batch=batch,
                 from_file=True)


@pytest.mark.parametrize("family", ["flux", "wan21_t2v", "wan21_i2v"])
def test_second_order_sampler_equals_stock(comfy_server, comfy, host_families, family):
    _need(family, host_families)
    check_family(comfy_server, comfy, f"heun_{family}", family, "cfg", cfg=4.0, sampler_name="heun")


def test_wan22_image_to_video_latent_with_per_frame_timesteps(comfy_server, comfy, host_families):
    """Wan 2.2 5B under a noise mask (its image-to-video latent keeps the first frame): the model receives the
    mask and one timestep per latent frame."""
    _need("wan22_5b", host_families)
    check_family(comfy_server, comfy, "wan22_5b_i2v", "wan22_5b", "cfg", cfg=4.0, noise_mask=True)
    check_family(comfy_server, comfy, "wan22_5b_i2v_batch", "wan22_5b", "batch", cfg=1.0, batch=2, noise_mask=True)


@pytest.mark.parametrize("strategy, cfg, batch", [("cfg", 4.0, 1), ("batch", 1.0, 2)])
@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_reference_latents_reach_the_workers(comfy_server, comfy, host_families, family, strategy, cfg, batch):
    """Edit models take reference latents (`ref_latents`, a list of per-row tensors): the workers get them cut
    with the rows, so the Multi-GPU run equals stock, which they change."""
    _need(family, host_families)
    name = f"ref_{family}_{strategy}"
    check_family(comfy_server, comfy, name, family, strategy, cfg=cfg, batch=batch, reference=True)
    plain = comfy.run_pair(comfy_server, f"noref_{family}_{strategy}", strategy, kind="family", family=family,
                           steps=STEPS, cfg=cfg, batch=batch)[0]
    stock = comfy_server.latent(f"{name}_stock")
    assert (stock - plain).abs().max() > 10 * comfy.RTOL_OF_SCALE * stock.abs().max()  # the reference matters
