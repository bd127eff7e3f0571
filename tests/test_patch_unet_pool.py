"""patch (DistriFusion) on a UNet through a pool of two CPU workers, the strategy end to end (host plan, worker
store, models/unet_patch.py) against one device over short DDIM loops of diffusers' SD1.5 layout at a narrow
width: warm-up covering every step equals one device; past warm-up the other band's halos, GroupNorm sums and
keys and values come from the step before (within the PSNR floor, and not equal); guided rows ([uncond; cond]
in one call) split the same way. Every run checks that both workers exchanged and which calls read stale values."""

from __future__ import annotations

import pytest

from parallel_backend.engine.config import ParallelConfig
from parallel_backend.engine.jobs import Job
from parallel_backend.engine.oracle import psnr, run_loop
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.runtime.pool import WorkerPool

pytestmark = pytest.mark.slow

STEPS = 6
TOLERANCE = 1e-4  # of the output's scale (TESTING.md)
PSNR_FLOOR_DB = 30.0


@pytest.fixture(scope="module")
def model():
    return build_bench_model("sd15-narrow")


@pytest.fixture(scope="module")
def pool():
    with WorkerPool("cpu:2") as pool:
        yield pool


def _both(model, pool, warmup: int, cfg: float):
    """(one device's loop, the pool's loop under patch 2) for one image at guidance `cfg`."""
    job, resolution = Job(1, cfg), (model.default_resolution,) * 2
    reference = run_loop(model, job, resolution, steps=STEPS, repeats=0)
    executor = ParallelExecutor(pool, ParallelConfig("cpu:2", "patch", cfg_degree=1, patch=2, warmup=warmup))
    return reference, run_loop(model, job, resolution, steps=STEPS, repeats=0, executor=executor)


def _stale_calls(loop) -> int:
    """The pool calls in which rank 0 read values of the call before (its `synchronous` figure false)."""
    return sum(not call["extra"][0]["synchronous"] for call in loop.calls)


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_warm_up_covering_every_step_equals_one_device(model, pool, cfg):
    reference, split = _both(model, pool, warmup=STEPS, cfg=cfg)
    scale = max(1.0, reference.latents.abs().max().item())
    assert (split.latents - reference.latents).abs().max().item() <= TOLERANCE * scale
    assert len(split.calls) == STEPS and all(call["bytes"] > 0 for call in split.calls)  # both bands exchanged
    assert _stale_calls(split) == 0


def test_past_warm_up_the_other_band_is_a_step_stale_within_the_floor(model, pool):
    reference, split = _both(model, pool, warmup=1, cfg=1.0)
    assert _stale_calls(split) == STEPS - 1
    difference = (split.latents - reference.latents).abs().max().item()
    assert difference > TOLERANCE * max(1.0, reference.latents.abs().max().item())  # the stale path really ran
    assert psnr(reference.latents, split.latents) >= PSNR_FLOOR_DB


def test_a_latent_the_bands_cannot_take_is_refused_on_the_host_before_any_work(model, pool):
    """12 latent rows do not cut into bands of whole multiples of the UNet's downsampling (8): one sentence from
    the host, before the workers run a call."""
    executor = ParallelExecutor(pool, ParallelConfig("cpu:2", "patch", cfg_degree=1, patch=2, warmup=1))
    calls = pool.stats.calls
    with pytest.raises(ValueError, match="bands of whole multiples of 8 rows"):
        run_loop(model, Job(1, 1.0), (96, model.default_resolution), steps=1, repeats=0, executor=executor)
    assert pool.stats.calls == calls
