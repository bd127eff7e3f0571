"""Faults injected into a running job, for every strategy: each worker killed (SIGKILL) or stopped (SIGSTOP)
at a seeded random call. Each must surface as an error within its deadline (+ 5 s) naming the right worker;
the next job must succeed with the same result as before the fault; no process and no file of the pool may
be left behind. The pools run with a hang floor of 5 s rather than the default 20 s: a stopped worker is named
once its heartbeat has been silent for the floor, whatever its value (still under the process group's 60 s
timeout, as the default is), so a shorter one only saves each SIGSTOP case the wait."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
import torch

from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.engine.config import ParallelConfig
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.engine.oracle import Job, LoopResult, run_once
from parallel_backend.runtime.pool import WorkerError, WorkerPool

pytestmark = pytest.mark.slow

RESOLUTION, STEPS = (64, 64), 12
HANG_FLOOR_S = 5.0  # the pool's default is 20 s
JOBS = {"cfg": Job(1, 7.5), "batch": Job(2, 1.0), "asyncdiff": Job(1, 1.0)}


class InjectAt:
    """An executor that sends `signum` to a worker while the host issues call number `at` of the job."""

    def __init__(self, executor, at: int, pid: int, signum: int):
        self.executor, self.at, self.pid, self.signum = executor, at, pid, signum
        self.calls, self.sent_at = 0, None

    def job(self):
        return self.executor.job()

    def run(self, *args, **kwargs):
        if self.calls == self.at:
            threading.Timer(0.005, self._send).start()  # lands during the call (or just before the next one)
        self.calls += 1
        return self.executor.run(*args, **kwargs)

    def _send(self):
        self.sent_at = time.monotonic()
        os.kill(self.pid, self.signum)


def sample(model, strategy: str, executor) -> torch.Tensor:
    result = LoopResult()
    run_once(model, JOBS[strategy], RESOLUTION, STEPS, result, timed=False, executor=executor)
    return result.latents


@pytest.fixture(scope="module")
def model():
    return build_bench_model("small")


@pytest.fixture(scope="module")
def pool():
    """One pool for the module: each case's fault stops it and its next job restarts it, so the case after
    starts on the restarted pool instead of paying a start and a model load of its own."""
    pool = WorkerPool("cpu:2", hang_floor_s=HANG_FLOOR_S)
    yield pool
    pool.shutdown()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["kill-9", "sigstop"])
@pytest.mark.parametrize("victim", [0, 1])
@pytest.mark.parametrize("strategy", ["cfg", "batch", "asyncdiff"])
def test_a_killed_or_stopped_worker_is_named_within_its_deadline_and_the_next_job_succeeds(
        model, pool, strategy, victim, how, procs):
    executor = ParallelExecutor(pool, ParallelConfig("cpu:2", strategy, warmup=2 if strategy == "asyncdiff" else 1))
    at = random.Random(f"{strategy}-{victim}-{how.name}").randrange(1, STEPS - 2)
    try:
        before = sample(model, strategy, executor)  # also times this kind of call: its deadline is measured
        starts = pool.stats.starts
        pids, folder = pool.worker_pids(), pool._dir
        injector = InjectAt(executor, at, pids[victim], how)
        with pytest.raises(WorkerError) as caught:
            sample(model, strategy, injector)
        noticed = time.monotonic() - injector.sent_at
        message = str(caught.value)
        print(f"{strategy} worker {victim} {how.name} at call {at}: noticed in {noticed:.1f} s: {message}")
        assert caught.value.rank == victim and message.startswith(f"cpu (worker {victim}), call "), message
        if how == signal.SIGKILL:
            assert "SIGKILL" in message and noticed < 5.0, (message, noticed)
        else:
            assert "stopped answering" in message and noticed < HANG_FLOOR_S + 5.0, (message, noticed)
        assert not pool.started
        assert procs.orphans(pids, 10) == [] and not folder.exists(), "the faulty pool left processes or files"
        after = sample(model, strategy, executor)  # the pool restarts; the same job gives the same result
        torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
        assert pool.stats.starts == starts + 1
    except BaseException:
        pool.shutdown()  # the next case starts from a clean pool
        raise
