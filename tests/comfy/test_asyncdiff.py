"""asyncdiff on ComfyUI's own UNetModel: its layer sequence equals the model (ControlNet residuals included),
and the Multi-GPU KSampler with warm-up covering every step equals the stock KSampler."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_unets(comfy_server):
    """ComfyUI's UNetModel objects of the test fixtures, built in this process (ComfyUI on sys.path)."""
    import os

    sys.path[:0] = [os.environ["COMFYUI_PATH"], str(Path(__file__).parent)]
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: this test process has no GPU to look for
    from fixture_nodes import tiny_sd1_model

    return {family: tiny_sd1_model(5, family).model.diffusion_model for family in ("sd1", "sdxl")}


def _control_like(profile, mid: int, generator) -> dict:
    """ControlNet-shaped residuals: one per skip for 'input' and 'output', one for 'middle' (batch 2)."""
    skips = [shape for shape, _ in profile.crossing[mid][1:]]
    rand = lambda shape: torch.randn(2, *shape, generator=generator)  # noqa: E731
    return {"input": [rand(s) for s in reversed(skips)], "middle": [rand(profile.crossing[mid][0][0])],
            "output": [rand(s) for s in skips]}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("side", [8, 9])  # 9: odd latents, upsampled to each skip's size
def test_layers_equal_comfy_unet_forward_with_control(tiny_unets, family, side):
    from parallel_backend.runtime.calls import ModelCall
    from parallel_backend.models import comfy_unet
    from parallel_backend.models.stages import Activations, profile, run_layers

    unet = tiny_unets[family]
    generator = torch.Generator().manual_seed(side)
    x = torch.randn(2, 4, side, side, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    extras = {"y": torch.randn(2, 2816, generator=generator)} if family == "sdxl" else {}
    t = torch.tensor([700.0, 700.0])
    layers = comfy_unet.layers(unet)
    with torch.inference_mode():
        plain = ModelCall(x, t, context, dict(extras))
        measured = profile(layers, comfy_unet.prepare(unet, plain, t), Activations(x), repeats=1)
        mid = next(i for i, name in enumerate(measured.names) if name.startswith("middle"))
        control = _control_like(measured, mid, generator)
        copy = lambda: {k: list(v) for k, v in control.items()}  # noqa: E731  (ComfyUI pops from these lists)
        reference = comfy_unet.forward(unet, ModelCall(x, t, context, dict(extras, control=copy())))
        call = ModelCall(x, t, context, dict(extras, control=copy()))
        out = run_layers(layers, comfy_unet.prepare(unet, call, t), Activations(x)).h
        without = comfy_unet.forward(unet, plain)
    assert (reference - without).abs().max() > 1e-3  # the residuals matter
    torch.testing.assert_close(out, reference, atol=0, rtol=0)


@pytest.mark.parametrize("cfg, family", [(6.0, "sd1"), (1.0, "sd1"), (6.0, "sdxl")])
def test_asyncdiff_with_warm_up_covering_every_step_equals_stock(comfy_server, comfy, cfg, family):
    stock, tandem = comfy.run_pair(comfy_server, f"asyncdiff_exact_{family}_{int(cfg)}", "asyncdiff", cfg=cfg,
                                   family=family, settings={"warmup": 6})
    comfy.assert_same_latents(tandem, stock)
    assert comfy_server.get("/tandem/status")["last_run"]["strategy"] == "asyncdiff"


def test_asyncdiff_after_warm_up_is_close_but_not_equal(comfy_server, comfy):
    stock, tandem = comfy.run_pair(comfy_server, "asyncdiff_stale", "asyncdiff", settings={"warmup": 2})
    from parallel_backend.commands.bench import psnr

    assert (tandem - stock).abs().max() > comfy.RTOL_OF_SCALE * stock.abs().max()  # stale inputs after warm-up
    assert psnr(stock, tandem) > 15, psnr(stock, tandem)


def test_asyncdiff_with_heun_two_calls_per_step(comfy_server, comfy):
    stock, tandem = comfy.run_pair(comfy_server, "asyncdiff_heun", "asyncdiff", sampler_name="heun",
                                   settings={"warmup": 6})
    comfy.assert_same_latents(tandem, stock)


def test_asyncdiff_under_a_memory_cap_streams_within_it_and_equals_stock(comfy_server, comfy):
    """The Settings node's max memory per device below what the heavier stage holds: that stage streams its last
    layers from host memory each call and holds at most the cap, and with warm-up covering every step the run
    still equals the stock KSampler; without the cap it holds them all."""
    stock, held = comfy.run_pair(comfy_server, "asyncdiff_held", "asyncdiff", settings={"warmup": 6})
    comfy.assert_same_latents(held, stock)
    whole = comfy_server.get("/tandem/status")["model_weights_bytes"]
    cap = 0.85 * max(whole)
    stock, capped = comfy.run_pair(comfy_server, "asyncdiff_capped", "asyncdiff",
                                   settings={"warmup": 6, "memory_per_device": cap / 2**30})
    comfy.assert_same_latents(capped, stock)
    status = comfy_server.get("/tandem/status")
    assert status["last_run"]["strategy"] == "asyncdiff"
    assert max(status["model_weights_bytes"]) <= cap < max(whole), (status["model_weights_bytes"], whole)
