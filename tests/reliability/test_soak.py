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

        def memory() -> list[int]:
            gc.collect()
            return [procs.rss(pid) for pid in (os.getpid(), *pool.worker_pids())]

        run(WARMUP_JOBS)
        before, calls = memory(), pool.stats.calls
        run(JOBS)
        after = memory()
        assert pool.stats.calls - calls == JOBS * STEPS and not pool.stats.failures and pool.stats.starts == 1
        growth = {name: a - b for name, a, b in zip(("host", "worker 0", "worker 1"), after, before)}
        print("RSS growth over", JOBS, "jobs:", {k: f"{v / 2**20:+.2f} MiB" for k, v in growth.items()},
              "of", [f"{b / 2**20:.0f} MiB" for b in before])
        assert all(g < GROWTH_LIMIT for g in growth.values()), growth
