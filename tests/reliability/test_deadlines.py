"""Deadlines that fit the work: a worker that keeps its heartbeat but never answers (a deadlock, a runaway
kernel) is declared hung after 10x the median of its kind of call (at least the floor), or after the
first-call bound before that kind was timed; the error names it and says which bound it broke."""

from __future__ import annotations

import time

import pytest
import torch

from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.runtime.calls import ModelCall
from parallel_backend.engine.config import ParallelConfig
from parallel_backend.runtime.deadlines import MIN_TIMINGS, CallClock, load_bound
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.runtime.pool import WorkerError, WorkerPool

pytestmark = pytest.mark.slow

# Run in every worker at start: worker 1 sleeps (alive, its heartbeat going) in the call with this index.
STALL = """
import sys, time
import parallel_backend.models as models


def stall_at(index):
    if sys.argv[sys.argv.index("--rank") + 1] != "1":
        return
    plain = models.forward_for_family

    def forward_for_family(family):
        forward = plain(family)
        return lambda module, call: time.sleep(3600) if call.index == index else forward(module, call)

    models.forward_for_family = forward_for_family
"""


def calls(model, count: int):
    for index in range(count):
        x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(index))
        yield ModelCall(x, torch.tensor(500 - index), torch.randn(2, *model.context_shape), index=index)


def test_the_clock_uses_the_first_bound_then_a_multiple_of_the_median_above_the_floor():
    clock = CallClock(factor=10, floor_s=20, first_s=300)
    assert clock.deadline("k")[0] == 300
    for seconds in [0.1] * MIN_TIMINGS:
        clock.record("k", seconds)
    assert clock.deadline("k")[0] == 20  # 10 x 0.1 s is under the floor
    for seconds in [5.0] * MIN_TIMINGS * 2:
        clock.record("k", seconds)
    assert clock.deadline("k") == (50.0, "10x this call's median of 5 s")
    assert clock.deadline("other")[0] == 300
    assert load_bound(10 * 2**30, 300)[0] > 300  # 10 GiB at 50 MB/s takes longer than the first-call bound


@pytest.mark.parametrize("stalled_call, bound", [(6, "the floor"), (0, "not yet timed")])
def test_a_live_worker_that_never_answers_is_named_after_its_deadline(tmp_path, stalled_call, bound):
    setup = tmp_path / "stall.py"
    setup.write_text(STALL)
    model = build_bench_model("tiny")
    pool = WorkerPool("cpu:2", timeout_s=6, hang_floor_s=3, worker_setup=(str(setup), "stall_at", stalled_call))
    executor = ParallelExecutor(pool, ParallelConfig("cpu:2", "batch"))
    try:
        pool.ensure_model(model.unet, "diffusers_unet")  # started and loaded: only the calls are timed below
        with executor.job():
            with pytest.raises(WorkerError) as caught:
                for call in calls(model, 8):
                    started = time.monotonic()
                    executor(model.unet, "diffusers_unet", call)
        waited = time.monotonic() - started
        message = str(caught.value)
        assert caught.value.rank == 1 and message.startswith(f"cpu (worker 1), call {stalled_call}"), message
        assert "although still running" in message and bound in message, message
        limit = 3 if stalled_call else 6
        assert limit - 0.5 < waited < limit + 5, waited
        assert not pool.started
    finally:
        pool.shutdown()
