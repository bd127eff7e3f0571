"""`auto` and every strategy that fits, on pools of 1 to 5 CPU workers: the exact ones (and asyncdiff with a
warm-up covering every step) equal one device, auto on whatever mesh its plan chooses (tests/test_auto_plan.py
checks the choices); devices a call cannot use sit out and the log says so."""

from __future__ import annotations

import logging

import pytest
import torch

from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.engine.config import ParallelConfig
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.engine.oracle import Job, run_loop
from parallel_backend.runtime.pool import WorkerPool

pytestmark = pytest.mark.slow

ATOL = 1e-4
STEPS = 3
JOBS = {"guided, 2 images": Job(2, 5.0), "cfg 1, 3 images": Job(3, 1.0)}


@pytest.fixture(scope="module")
def small():
    return build_bench_model("small")


@pytest.fixture(scope="module")
def references(small):
    return {name: run_loop(small, job, (64, 64), steps=STEPS, repeats=0).latents for name, job in JOBS.items()}


def strategies_that_fit(n: int) -> list[dict]:
    fits = [dict(strategy="auto"), dict(strategy="batch"), dict(strategy="asyncdiff", warmup=STEPS)]
    return fits + ([dict(strategy="cfg")] if n >= 2 else [])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_every_strategy_that_fits_equals_one_device(small, references, n, caplog):
    caplog.set_level(logging.INFO, logger="tandem")
    with WorkerPool(f"cpu:{n}", timeout_s=300) as pool:
        for knobs in strategies_that_fit(n):
            for name, job in JOBS.items():
                if knobs["strategy"] == "cfg" and job.cfg == 1.0:
                    continue  # refused before work (tested in test_config)
                executor = ParallelExecutor(pool, ParallelConfig(f"cpu:{n}", **knobs))
                calls = pool.stats.calls
                result = run_loop(small, job, (64, 64), steps=STEPS, repeats=0, executor=executor).latents
                assert pool.stats.calls == calls + STEPS, (knobs, name)  # the pool ran every call
                torch.testing.assert_close(result, references[name], atol=ATOL, rtol=ATOL, msg=f"{knobs} {name}")
    if n >= 5:  # cfg on a guided 2-image call uses cfg 2 x batch 2: the fifth device sits out, said once
        idle = [r.getMessage() for r in caplog.records if "sits out:" in r.getMessage()]
        assert any("cpu (worker 4)" in line for line in idle) and len(idle) == len(set(idle))


def test_with_one_worker_auto_runs_on_it_and_cfg_is_refused_with_a_sentence(small, references):
    with pytest.raises(ValueError, match="strategy 'cfg': cfg 2 x batch 1 = 2 devices, but there are 1"):
        ParallelConfig("cpu:1", "cfg")
