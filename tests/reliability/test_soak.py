"""A soak: 200 jobs on one pool, the strategies taking turns; nothing fails and neither the host's nor any
worker's resident memory grows by 20 MB or more after the warm-up."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.engine.config import ParallelConfig
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.engine.oracle import Job, LoopResult, run_once
from parallel_backend.runtime.pool import WorkerPool

pytestmark = pytest.mark.slow

JOBS, WARMUP_JOBS, STEPS = 200, 30, 3
GROWTH_LIMIT = 20 * 2**20
ROTATION = [("cfg", Job(1, 7.5)), ("batch", Job(2, 1.0)), ("asyncdiff", Job(1, 1.0))]


def _memory(procs, pool) -> list[int]:
    """The resident memory of the host and each worker, after a collection."""
    gc.collect()
    return [procs.rss(pid) for pid in (os.getpid(), *pool.worker_pids())]


def test_200_jobs_with_flat_memory(procs):
    model = build_bench_model("tiny")
    resolution = (model.default_resolution,) * 2
    with WorkerPool("cpu:2") as pool:
        executors = [(ParallelExecutor(pool, ParallelConfig("cpu:2", strategy)), job) for strategy, job in ROTATION]

        def run(count: int) -> None:
            for n in range(count):
                executor, job = executors[n % len(executors)]
                result = LoopResult()
                run_once(model, job, resolution, STEPS, result, timed=False, executor=executor)
                assert torch.isfinite(result.latents).all()

        run(WARMUP_JOBS)
        before, calls = _memory(procs, pool), pool.stats.calls
        run(JOBS)
        after = _memory(procs, pool)
        assert pool.stats.calls - calls == JOBS * STEPS and not pool.stats.failures and pool.stats.starts == 1
        growth = {name: a - b for name, a, b in zip(("host", "worker 0", "worker 1"), after, before)}
        print("RSS growth over", JOBS, "jobs:", {k: f"{v / 2**20:+.2f} MiB" for k, v in growth.items()},
              "of", [f"{b / 2**20:.0f} MiB" for b in before])
        assert all(g < GROWTH_LIMIT for g in growth.values()), growth


@pytest.mark.parametrize("transport", ["files", "messages"])
def test_200_sharded_calls_with_failures_mixed_in_keep_memory_flat(procs, transport, monkeypatch):
    """Sharded weights (ulysses, then batch), one call in ten failing inside the model (a context of the wrong
    width: the context embedder's gather is done when its layer raises; the worker then frees what the call left
    gathered, WorkerState.release_gathered): every failure is the worker's error, named, the pool goes on without
    a restart, the next call succeeds, and no resident memory grows by 20 MB or more. Both transports: the CPU
    workers' files, and messages as between GPUs (gathered blocks are buffers of their own there)."""
    import importlib.util
    from pathlib import Path

    from parallel_backend.engine import weights as placement
    from parallel_backend.runtime.pool import WorkerError

    if transport == "messages":
        monkeypatch.setattr(placement, "local_cpus", lambda devices: False)

    spec = importlib.util.spec_from_file_location("sequence_dit_cases",
                                                  Path(__file__).parents[1] / "test_sequence_dit.py")
    built = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(built)
    model, call = built.tiny_flux(), built.flux_call(2, 7, 3, 5)
    broken = call.__class__(call.x, call.t, torch.randn(2, 7, 5), extras=call.extras)
    family = "diffusers_dit:flux"
    with WorkerPool("cpu:2") as pool:
        executors = [ParallelExecutor(pool, ParallelConfig("cpu:2", s, weights="sharded")) for s in ("ulysses", "batch")]
        failed = []

        def run(count: int) -> None:
            for n in range(count):
                executor = executors[n % 2]
                if n % 10 == 9:
                    with pytest.raises(WorkerError, match=r"^cpu \(worker [01]\)"):
                        executor.run(model, family, broken)
                    failed.append(n)
                else:
                    assert torch.isfinite(executor.run(model, family, call).out).all()

        run(WARMUP_JOBS)
        before, starts = _memory(procs, pool), pool.stats.starts
        run(JOBS)
        after = _memory(procs, pool)
        assert len(failed) == (WARMUP_JOBS + JOBS) // 10 and pool.stats.starts == starts  # the pool went on
        growth = {name: a - b for name, a, b in zip(("host", "worker 0", "worker 1"), after, before)}
        print("RSS growth over", JOBS, "sharded calls:", {k: f"{v / 2**20:+.2f} MiB" for k, v in growth.items()})
        assert all(g < GROWTH_LIMIT for g in growth.values()), growth
