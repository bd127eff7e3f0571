"""The process group's timeout: a surviving worker never blocks forever on a dead peer."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from parallel_backend.runtime import primitives
from parallel_backend.runtime.pool import WorkerPool
from parallel_backend.runtime.primitives import chunk_for_rank, chunk_sizes

pytestmark = pytest.mark.pool

RANK_SCRIPT = """
import os, sys, time, torch
from parallel_backend.runtime import primitives
rank = int(sys.argv[1])
primitives.join_group(sys.argv[2], rank, 2, "cpu", timeout_s=3.0)
if rank == 1:
    os._exit(0)  # dies without a word, mid-job
time.sleep(0.5)
try:
    primitives.dist.all_reduce(torch.ones(1))
    print("all_reduce returned")
except Exception as exc:
    print("raised", type(exc).__name__)
"""


def test_a_collective_with_a_dead_peer_fails_instead_of_hanging(tmp_path):
    rendezvous = f"file://{tmp_path}/rdzv"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    started = time.monotonic()
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(r), rendezvous], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    out, err = ranks[0].communicate(timeout=60)
    ranks[1].wait(timeout=10)
    assert "raised" in out or ranks[0].returncode != 0, out + err
    assert "all_reduce returned" not in out
    assert time.monotonic() - started < 45


def test_chunks():
    assert chunk_sizes(5, 2) == [3, 2] and chunk_sizes(1, 3) == [1, 0, 0]
    assert chunk_for_rank(5, 2, 1) == range(3, 5)


ORDER_SCRIPT = """
import sys, torch
from parallel_backend.runtime import primitives
rank = int(sys.argv[1])
primitives.pair_in_issue_order(sys.argv[3] == "strict")
primitives.join_group(sys.argv[2], rank, 2, "cpu", timeout_s=10.0)
if rank == 0:  # sends a 3-element tensor (tag 1), then a 5-element one (tag 0)
    primitives.wait_all(primitives.post_sends([torch.full((3,), 1.0), torch.full((5,), 2.0)], 1, tags=[1, 0]))
else:  # posts the 5-element receive (tag 0) first: pairs by tag on plain gloo, by order on NCCL
    try:
        buffers, handles = primitives.post_receives([((5,), torch.float32), ((3,), torch.float32)], 0, "cpu",
                                                    tags=[0, 1])
        primitives.wait_all(handles)
        print("received", [b.tolist() for b in buffers])
    except Exception as exc:
        print("raised", type(exc).__name__)
primitives.leave_group()
"""


def _exchange_out_of_order(tmp_path, strict: bool) -> str:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    rendezvous = f"file://{tmp_path}/rdzv-{int(strict)}"
    mode = "strict" if strict else "tags"
    ranks = [subprocess.Popen([sys.executable, "-c", ORDER_SCRIPT, str(r), rendezvous, mode], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    try:
        out, err = ranks[1].communicate(timeout=60)
    finally:
        for process in ranks:
            process.kill() if process.poll() is None else None
            process.wait(timeout=10)
    return out + err


def test_strict_mode_pairs_point_to_point_messages_in_issue_order_as_nccl_does(tmp_path):
    # plain gloo pairs the receives with the sends by tag: the out-of-order receiver gets the right tensors
    assert "received [[2.0, 2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0]]" in _exchange_out_of_order(tmp_path, strict=False)
    # strict mode ignores tags: the first receive (5 elements) meets the first send (3 elements) and fails
    assert "received" not in _exchange_out_of_order(tmp_path, strict=True)


class _CountingEnviron(dict):
    """os.environ's contents, counting every look-up."""

    reads = 0

    def __getitem__(self, name):
        type(self).reads += 1
        return super().__getitem__(name)

    def get(self, name, default=None):
        type(self).reads += 1
        return super().get(name, default)

    def __contains__(self, name):
        type(self).reads += 1
        return super().__contains__(name)


def test_an_exchange_reads_no_environment_variable_and_runs_only_an_installed_hook(monkeypatch):
    # Messages with no element are neither sent nor received (no process group needed), but the exchange's own
    # steps, strict mode's tags and the test hook's check, all run.
    monkeypatch.setattr(os, "environ", _CountingEnviron(os.environ))
    calls = []
    try:
        for strict in (False, True):
            primitives.pair_in_issue_order(strict)
            for _ in range(100):
                primitives.exchange([], [], "cpu")
                primitives.post_sends([], 1, tags=[])
                primitives.post_receives([], 0, "cpu", tags=[])
            assert primitives.strict() is strict
        primitives.on_exchange(lambda: calls.append(1))
        primitives.exchange([], [], "cpu")
    finally:
        primitives.on_exchange(None)
        primitives.pair_in_issue_order(False)
    assert _CountingEnviron.reads == 0
    assert calls == [1]


REPORT_SETUP = """
def report(path):
    from parallel_backend.runtime import primitives
    open(path, "w").write(f"{primitives.strict()} {primitives._exchange_hook}")
"""


def test_the_tests_pools_pair_messages_in_issue_order_and_install_no_exchange_hook(tmp_path):
    # tests/conftest.py sets TANDEM_STRICT_P2P=1; each worker reads it once, as it starts
    setup, report = tmp_path / "setup.py", tmp_path / "report.txt"
    setup.write_text(REPORT_SETUP)
    with WorkerPool("cpu:1", worker_setup=(str(setup), "report", str(report))):
        assert report.read_text() == "True None"
