"""A UNet as a sequence of layers (the stage cut's model side): all layers in order equal the model, and what
crosses any cut is exactly what the profile recorded. No processes."""

from __future__ import annotations

import pytest
import torch

from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.runtime.calls import ModelCall
from parallel_backend.models import diffusers_unet
from parallel_backend.models.stages import Activations, profile, run_layers


def _call(model, rows: int, pixels: int) -> ModelCall:
    generator = torch.Generator().manual_seed(3)
    side = pixels // model.latent_factor
    x = torch.randn(rows, model.unet.config.in_channels, side, side, generator=generator)
    context = torch.randn(rows, *model.context_shape, generator=generator)
    return ModelCall(x, torch.tensor(640), context, model.extras(rows))


# 72 px = 9 latents: odd sizes make the up path resize to each skip's size
@pytest.mark.parametrize("name, pixels", [("tiny", 32), ("sd15-narrow", 64), ("sd15-narrow", 72), ("sdxl-narrow", 64)])
def test_all_layers_in_order_equal_the_model(name, pixels):
    model = build_bench_model(name)
    call = _call(model, 2, pixels)
    with torch.inference_mode():
        reference = diffusers_unet.forward(model.unet, call)
        ctx = diffusers_unet.prepare(model.unet, call, call.t)
        out = run_layers(diffusers_unet.layers(model.unet), ctx, Activations(call.x)).h
    torch.testing.assert_close(out, reference, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["tiny", "sdxl-narrow"])
def test_running_stages_from_the_crossing_tensors_equals_the_model(name):
    model = build_bench_model(name)
    call = _call(model, 2, model.default_resolution)
    layers = diffusers_unet.layers(model.unet)
    with torch.inference_mode():
        ctx = diffusers_unet.prepare(model.unet, call, call.t)
        measured = profile(layers, ctx, Activations(call.x), repeats=1)
        reference = run_layers(layers, ctx, Activations(call.x)).h
        for cut in (1, len(layers) // 3, len(layers) // 2, len(layers) - 1):
            acts = run_layers(layers[:cut], ctx, Activations(call.x))
            crossing = acts.tensors()
            specs = measured.specs(cut, rows=2)
            assert [(tuple(t.shape), t.dtype) for t in crossing] == [(tuple(s), d) for s, d in specs], cut
            # the second stage sees only the crossing tensors (copies: nothing shared with the first)
            rest = run_layers(layers[cut:], ctx, Activations.from_tensors([t.clone() for t in crossing]))
            torch.testing.assert_close(rest.h, reference, atol=0, rtol=0)
    assert len(measured.seconds) == len(layers) and all(s > 0 for s in measured.seconds)


def test_up_path_carries_the_skips_a_cut_must_send():
    model = build_bench_model("sd15-narrow")
    call = _call(model, 1, 64)
    layers = diffusers_unet.layers(model.unet)
    with torch.inference_mode():
        ctx = diffusers_unet.prepare(model.unet, call, call.t)
        measured = profile(layers, ctx, Activations(call.x), repeats=1)
    names = measured.names
    mid = names.index("mid.resnet0")
    # SD1.5's layout: 12 skips (conv_in, 2 per level + 3 downsamplers) are all waiting at the middle
    assert len(measured.crossing[mid]) == 1 + 12
    assert len(measured.crossing[-1]) == 1  # before the head: only the hidden state


def test_unsupported_inputs_are_refused_with_the_way_out():
    model = build_bench_model("tiny")
    call = _call(model, 1, 32)
    call.extras = {"down_block_additional_residuals": ()}
    with pytest.raises(ValueError, match="use strategy cfg or batch"):
        diffusers_unet.prepare(model.unet, call, call.t)


def test_the_stage_families_named_without_torch_are_the_adapters():
    from parallel_backend.models.stage_families import STAGE_FAMILIES, adapter_for, adapters

    assert tuple(adapters()) == STAGE_FAMILIES and all(adapter_for(f).FAMILY == f for f in STAGE_FAMILIES)
