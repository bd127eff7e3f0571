"""`patch` (DistriFusion) for UNets (models/unet_patch.py) against the same UNet whole. Oracle: the whole UNet's
sampling loop in this process; the bands run as two gloo processes (point-to-point messages paired in issue
order, as on NCCL) over the same seeded narrow UNet (SD1.5's and SDXL's block structure), the same loop.
Warm-up covering every step equals the whole within 1e-4 of its scale; stale steps after a short warm-up stay
within 30 dB PSNR of it, and differ from it (the stale path really ran)."""

from __future__ import annotations

import itertools
import math
import time
from types import SimpleNamespace

import pytest
import torch

from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.models.unet_patch import band_heights, finish_pending, run_unet_patch
from parallel_backend.strategies.sequence.traffic import Traffic

RESOLUTION = (256, 128)  # pixels: a latent of 32 x 16, two bands of 16 rows
STEPS, WARMUP = 10, 2


def inputs(name: str):
    model = build_bench_model(name)
    noise = torch.randn(model.latent_shape(1, RESOLUTION), generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, *model.context_shape, generator=torch.Generator().manual_seed(1))
    return model, noise, text


def sample(model, noise, text, forward) -> torch.Tensor:
    """The bench model's DDIM loop of STEPS steps, each call run by `forward(ModelCall)`."""
    from parallel_backend.models.sampling import denoise

    latents, _ = denoise(lambda x, t, c: forward(model.call(x, t, c, RESOLUTION)), model.make_scheduler(), noise,
                         text, None, 1.0, STEPS, progress=False)
    return latents


def whole_sample(name: str) -> torch.Tensor:
    from parallel_backend.models.diffusers_unet import forward

    model, noise, text = inputs(name)
    with torch.inference_mode():
        return sample(model, noise, text, lambda call: forward(model.module, call))


def context(rank: int, world: int, **fields) -> SimpleNamespace:
    return SimpleNamespace(peers=tuple(range(world)), index=rank, degree=world, device="cpu", step=None,
                           synchronous=True, stale={}, traffic=Traffic(), **fields)


def patch_sample(name: str, rank: int, world: int, warmup: int, norms: str = "stale") -> dict:
    """The loop with each call in bands; calls before `warmup` synchronous, the rest stale."""
    model, noise, text = inputs(name)
    ctx, calls = context(rank, world, norms=norms), itertools.count()

    def forward(call):
        ctx.step = next(calls)
        ctx.synchronous = ctx.step < warmup
        return run_unet_patch(model.module, call, ctx)

    started = time.perf_counter()
    with torch.inference_mode():
        latents = sample(model, noise, text, forward)
    finish_pending(ctx.stale)
    seconds = time.perf_counter() - started
    restored = not any("forward" in m.__dict__ for m in model.module.modules())
    return {"latents": latents, "bytes": ctx.traffic.bytes_sent, "passes": ctx.traffic.passes,
            "waited_s": ctx.traffic.waited_s, "seconds": seconds, "restored": restored}


RANK_SCRIPT = '''
import sys
sys.path.insert(0, sys.argv[4])
import torch
from gloo_rank import join
from test_unet_patch import STEPS, patch_sample

rank, world = join()
name, out = sys.argv[5], sys.argv[6]
runs = {"exact": patch_sample(name, rank, world, warmup=STEPS),
        "stale": patch_sample(name, rank, world, warmup=2),
        "stale_norms_synchronous": patch_sample(name, rank, world, warmup=2, norms="synchronous")}
torch.save(runs, f"{out}/rank{rank}.pt")
'''


def psnr(out: torch.Tensor, reference: torch.Tensor) -> float:
    mse = (out - reference).pow(2).mean().item()
    peak = (reference.max() - reference.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


@pytest.mark.pool
@pytest.mark.parametrize("name", ["sd15-narrow", "sdxl-narrow"])
def test_patch_over_gloo_processes_against_the_whole(gloo_ranks, tmp_path, name):
    gloo_ranks(RANK_SCRIPT, 2, name, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    reference = whole_sample(name)
    scale = max(1.0, reference.abs().max().item())
    exact = ranks[0]["exact"]["latents"]
    assert (exact - reference).abs().max().item() <= 1e-4 * scale
    for run in ("stale", "stale_norms_synchronous"):
        latents = ranks[0][run]["latents"]
        assert torch.equal(latents, ranks[1][run]["latents"])  # every rank returns the same whole
        assert (latents - reference).abs().max().item() > 1e-4 * scale  # stale values were really used
        assert psnr(latents, reference) >= 30.0, (run, psnr(latents, reference))
    for rank in ranks:
        assert all(run["bytes"] > 0 and run["restored"] for run in rank.values())
    print({run: round(psnr(ranks[0][run]["latents"], reference), 1) for run in ranks[0]})


def test_rows_that_do_not_make_bands_are_refused_in_one_sentence():
    model, _, text = inputs("sd15-narrow")
    for rows, words in ((20, "multiples of 8 rows"), (8, "at most 1 devices")):
        x = torch.randn(1, 4, rows, 16)
        with pytest.raises(ValueError, match=words) as refused:
            run_unet_patch(model.module, model.call(x, torch.tensor(500), text, RESOLUTION), context(0, 2))
        assert str(refused.value).count(". ") == 0
    assert not any("forward" in m.__dict__ for m in model.module.modules())  # refused before any layer was wrapped


def test_band_heights_are_multiples_of_the_downsampling():
    assert band_heights(40, 8, 2) == [24, 16]
    assert band_heights(32, 8, 4) == [8, 8, 8, 8]
