"""Faults in the middle of a sequence-parallel, patch or tensor exchange: a worker killed (SIGKILL) or stopped (SIGSTOP) as it
posts its k-th exchange (a ring pass, an all-to-all; exchange_fault.py, installed through the pool's worker
set-up). The host must name the right worker within the deadline, leave no process behind, and the next job
must succeed with the result from before. (This is where peers hang: one rank waits forever for a transfer
that never comes.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.engine.config import ParallelConfig
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.engine.oracle import Job, LoopResult, run_once
from parallel_backend.runtime.pool import WorkerError, WorkerPool

pytestmark = pytest.mark.slow

FAULT = str(Path(__file__).with_name("exchange_fault.py"))
RESOLUTION, STEPS = (64, 64), 3
HANG_FLOOR_S = 5.0  # the pool's default is 20 s; a shorter floor only saves the SIGSTOP cases the wait


@pytest.fixture(scope="module")
def model():
    return build_bench_model("flux-small")


@pytest.fixture(scope="module")
def befores() -> dict:
    """strategy -> the result of a pool of this module's settings before any fault: the same for SIGKILL and
    SIGSTOP, so the second case of a strategy takes it from the first instead of starting a pool for it again."""
    return {}


def sample(model, executor) -> torch.Tensor:
    result = LoopResult()
    run_once(model, Job(1, 1.0), RESOLUTION, STEPS, result, timed=False, executor=executor)
    return result.latents


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
@pytest.mark.parametrize("strategy, victim, at", [("ring", 1, 9), ("ulysses", 0, 14), ("tensor", 1, 30),
                                                  ("batch+sharded", 1, 20), ("patch", 1, 10)])
def test_a_worker_lost_mid_exchange_is_named_and_the_next_job_succeeds(model, befores, strategy, victim, at, how,
                                                                       procs, tmp_path, monkeypatch):
    """flux-small has 6 attention blocks (a ring pass each on 2 workers; 2 to 4 all-to-alls for ulysses) and a
    gather per call; tensor exchanges 21 times per call (6 per double block, 2 per single block, 1 for the output
    modulation); batch with sharded weights gathers each of its 9 units once per call, worker 1 running the
    one-row call's row only to serve its pieces (its gathers by messages, as between GPUs: the CPU workers' files
    are turned off), so exchange `at` falls inside one of the restarted pool's first calls. patch posts one
    exchange per attention and one gather per call (7): exchange 10 is the third attention of call 1, the first
    past warm-up, whose exchange is left in flight for the next call (asynchronous). The time until the
    error is counted from the fault (the victim writes the time as it signals itself), not from the job's start:
    the restart before it takes what this machine's load makes it take."""
    from parallel_backend.engine import weights as placement

    name, _, weights = strategy.partition("+")
    if weights:
        monkeypatch.setattr(placement, "local_cpus", lambda devices: False)
    executor_pool = WorkerPool("cpu:2", hang_floor_s=HANG_FLOOR_S)
    executor = ParallelExecutor(executor_pool, ParallelConfig("cpu:2", name, weights=weights or "replicated"))
    try:
        if strategy not in befores:
            befores[strategy] = sample(model, executor)
            assert executor_pool.stats.calls > 0  # the pool ran
            executor_pool.shutdown()
        before = befores[strategy]
        fired = tmp_path / "fault_time"
        executor_pool.worker_setup = (FAULT, "signal_at_exchange", f"{victim}:{at}:{how}:{fired}")  # restarted workers
        with pytest.raises(WorkerError) as caught:
            sample(model, executor)
        noticed = time.time() - float(fired.read_text())
        message = str(caught.value)
        print(f"{strategy} worker {victim} {how} at exchange {at}: {noticed:.1f} s: {message}")
        assert caught.value.rank == victim and message.startswith(f"cpu (worker {victim}), call "), message
        bound = 5.0 if how == "SIGKILL" else HANG_FLOOR_S + 5.0
        assert noticed < bound, (message, noticed)
        pids = executor_pool.worker_pids() or []
        assert not executor_pool.started and procs.orphans(pids, 10) == []
        executor_pool.worker_setup = None
        calls = executor_pool.stats.calls
        after = sample(model, executor)
        assert executor_pool.stats.calls > calls  # the restarted pool ran the job
        torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    finally:
        executor_pool.shutdown()
