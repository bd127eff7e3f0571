"""`patch` (DistriFusion) for UNets (models/unet_patch.py) against the same UNet whole. Oracle: the whole UNet's
sampling loop in this process; the bands run as two gloo processes (point-to-point messages paired in issue
order, as on NCCL) over the same seeded narrow UNet (SD1.5's and SDXL's block structure), the same loop.
Warm-up covering every step equals the whole within 1e-4 of its scale; stale steps after a short warm-up stay
within 30 dB PSNR of it, and differ from it (the stale path really ran)."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.models.unet_patch import band_heights, finish_pending, run_unet_patch
from parallel_backend.strategies.sequence.traffic import Traffic

RESOLUTION = (256, 128)  # pixels: a latent of 32 x 16, two bands of 16 rows
STEPS, WARMUP = 10, 2


@dataclass
class Inputs:
    """A seeded UNet, its noise and text, `call(x, t, text)` -> its ModelCall and `forward(module, call)`."""

    module: torch.nn.Module
    noise: torch.Tensor
    text: torch.Tensor
    call: Callable
    forward: Callable


def diffusers_inputs(name: str) -> Inputs:
    """A narrow diffusers bench UNet (`sd15-narrow`, `sdxl-narrow`) at RESOLUTION."""
    from parallel_backend.models.diffusers_unet import forward

    model = build_bench_model(name)
    noise = torch.randn(model.latent_shape(1, RESOLUTION), generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, *model.context_shape, generator=torch.Generator().manual_seed(1))
    return Inputs(model.module, noise, text, lambda x, t, c: model.call(x, t, c, RESOLUTION), forward)


def sample(inputs: Inputs, forward) -> torch.Tensor:
    """A DDIM loop of STEPS steps on `inputs`, each call run by `forward(ModelCall)`."""
    from parallel_backend.models.sampling import denoise, make_scheduler
    from parallel_backend.tiny.model import SCHEDULER_CONFIG

    with torch.inference_mode():
        latents, _ = denoise(lambda x, t, c: forward(inputs.call(x, t, c)), make_scheduler("ddim", SCHEDULER_CONFIG),
                             inputs.noise, inputs.text, None, 1.0, STEPS, progress=False)
    return latents


def whole_sample(inputs: Inputs) -> torch.Tensor:
    return sample(inputs, lambda call: inputs.forward(inputs.module, call))


def context(rank: int, world: int, **fields) -> SimpleNamespace:
    return SimpleNamespace(peers=tuple(range(world)), index=rank, degree=world, device="cpu", step=None,
                           synchronous=True, stale={}, traffic=Traffic(), **fields)


def patch_sample(inputs: Inputs, rank: int, world: int, warmup: int, norms: str = "stale") -> dict:
    """The loop with each call in bands; calls before `warmup` synchronous, the rest stale."""
    ctx, calls = context(rank, world, norms=norms), itertools.count()

    def forward(call):
        ctx.step = next(calls)
        ctx.synchronous = ctx.step < warmup
        return run_unet_patch(inputs.module, call, ctx)

    started = time.perf_counter()
    latents = sample(inputs, forward)
    finish_pending(ctx.stale)
    seconds = time.perf_counter() - started
    restored = not any("forward" in m.__dict__ for m in inputs.module.modules())
    return {"latents": latents, "bytes": ctx.traffic.bytes_sent, "passes": ctx.traffic.passes,
            "waited_s": ctx.traffic.waited_s, "seconds": seconds, "restored": restored}


def first(inputs: Inputs):
    """A call on the loop's noise, at timestep 500."""
    return inputs.call(inputs.noise, torch.tensor(500), inputs.text)


def reshaped(inputs: Inputs):
    """A call of another shape than the loop's: 2 rows of 40 x 16 latents (unequal bands: 24 and 16 rows)."""
    x = torch.randn(2, *inputs.noise.shape[1:-2], 40, inputs.noise.shape[-1], generator=torch.Generator().manual_seed(5))
    return inputs.call(x, torch.tensor(400), inputs.text.expand(2, -1, -1))


def second_call(inputs: Inputs, rank: int, world: int, second) -> torch.Tensor:
    """The output of a stale call (not synchronous) of `second` after a synchronous call of the loop's first."""
    ctx = context(rank, world)
    with torch.inference_mode():
        run_unet_patch(inputs.module, first(inputs), ctx)
        ctx.synchronous = False
        return run_unet_patch(inputs.module, second, ctx)


# argv after the rendezvous: the model's name, the folder the ranks write to, and "file:function" building the
# Inputs (the file's path relative to the tests folder)
RANK_SCRIPT = '''
import importlib.util
import sys
sys.path.insert(0, sys.argv[4])
import torch
from gloo_rank import join
from test_unet_patch import STEPS, WARMUP, first, patch_sample, reshaped, second_call

rank, world = join()
name, out, (path, function) = sys.argv[5], sys.argv[6], sys.argv[7].split(":")
spec = importlib.util.spec_from_file_location("inputs_builder", f"{sys.argv[4]}/{path}")
builder = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(builder)
inputs = getattr(builder, function)(name)
runs = {"exact": patch_sample(inputs, rank, world, warmup=STEPS),
        "stale": patch_sample(inputs, rank, world, warmup=WARMUP),
        "stale_norms_synchronous": patch_sample(inputs, rank, world, warmup=WARMUP, norms="synchronous")}
# no stale entry fits a call of another shape: it runs synchronous
runs["reshaped"] = second_call(inputs, rank, world, reshaped(inputs))
# the same call again: what the previous call posted is what this one would compute, so stale equals the whole
runs["repeated"] = second_call(inputs, rank, world, first(inputs))
torch.save(runs, f"{out}/rank{rank}.pt")
'''


def check_against_whole(gloo_ranks, folder, name: str, builder: str, inputs: Inputs) -> dict:
    """Runs RANK_SCRIPT on two gloo ranks and checks its runs against the whole loop; returns the PSNRs."""
    gloo_ranks(RANK_SCRIPT, 2, name, str(folder), builder)
    ranks = [torch.load(folder / f"rank{r}.pt") for r in range(2)]
    for run, call in (("reshaped", reshaped(inputs)), ("repeated", first(inputs))):
        with torch.inference_mode():
            whole = inputs.forward(inputs.module, call)
        for rank in ranks:
            assert (rank.pop(run) - whole).abs().max().item() <= 1e-4 * max(1.0, whole.abs().max().item()), run
    reference = whole_sample(inputs)
    scale = max(1.0, reference.abs().max().item())
    assert (ranks[0]["exact"]["latents"] - reference).abs().max().item() <= 1e-4 * scale
    for run in ("stale", "stale_norms_synchronous"):
        latents = ranks[0][run]["latents"]
        assert torch.equal(latents, ranks[1][run]["latents"])  # every rank returns the same whole
        assert (latents - reference).abs().max().item() > 1e-4 * scale  # stale values were really used
        assert psnr(latents, reference) >= 30.0, (run, psnr(latents, reference))
    for rank in ranks:
        assert all(run["bytes"] > 0 and run["restored"] for run in rank.values())
    return {run: round(psnr(ranks[0][run]["latents"], reference), 1) for run in ranks[0]}


def psnr(out: torch.Tensor, reference: torch.Tensor) -> float:
    mse = (out - reference).pow(2).mean().item()
    peak = (reference.max() - reference.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


@pytest.mark.pool
@pytest.mark.parametrize("name", ["sd15-narrow", "sdxl-narrow"])
def test_patch_over_gloo_processes_against_the_whole(gloo_ranks, tmp_path, name):
    print(name, check_against_whole(gloo_ranks, tmp_path, name, "test_unet_patch.py:diffusers_inputs",
                                    diffusers_inputs(name)))


def test_rows_that_do_not_make_bands_are_refused_in_one_sentence():
    inputs = diffusers_inputs("sd15-narrow")
    for rows, words in ((20, "multiples of 8 rows"), (8, "at most 1 devices")):
        x = torch.randn(1, 4, rows, 16)
        with pytest.raises(ValueError, match=words) as refused:
            run_unet_patch(inputs.module, inputs.call(x, torch.tensor(500), inputs.text), context(0, 2))
        assert str(refused.value).count(". ") == 0
    assert not any("forward" in m.__dict__ for m in inputs.module.modules())  # refused before any layer was wrapped


def test_band_heights_are_multiples_of_the_downsampling():
    assert band_heights(40, 8, 2) == [24, 16]
    assert band_heights(32, 8, 4) == [8, 8, 8, 8]
