"""Start-up that nothing else on the machine can break: connections to the handshake that fail to
authenticate are refused and the pool keeps waiting for its own workers; two threads starting a stopped pool
get one pool; time limits that could switch waiting off are refused."""

from __future__ import annotations

import os
import pickle
import socket
import struct
import threading

import pytest

from parallel_backend.runtime.messages import Hello, Ping
from parallel_backend.runtime.pool import WorkerPool

pytestmark = pytest.mark.slow


def test_garbage_a_forged_hello_and_a_silent_peer_do_not_stop_the_start(monkeypatch):
    intruders = []
    spawn = WorkerPool._spawn

    def spawn_after_intruders(self, devices, address, authkey):
        garbage, forged, silent = (socket.create_connection(tuple(address)) for _ in range(3))
        garbage.sendall(os.urandom(300))
        hello = pickle.dumps(Hello(0, os.getpid()))  # framed as a Connection message, without the key
        forged.sendall(struct.pack("!i", len(hello)) + hello)
        intruders.extend([garbage, forged, silent])  # the silent one says nothing until its handshake's deadline
        spawn(self, devices, address, authkey)

    monkeypatch.setattr(WorkerPool, "_spawn", spawn_after_intruders)
    with WorkerPool("cpu:2", start_timeout_s=60) as pool:
        # The garbage and the forged hello are refused; the silent peer's handshake, in a thread of its own, is
        # usually still under way when the workers are in: the start does not wait for it (tests/reliability/
        # test_startup_strangers.py checks that), it is dropped at its deadline.
        assert len(pool.worker_pids()) == 2
        assert pool.stats.refused_connections in (2, 3)  # 3: a start slower than the deadline (a loaded machine)
        assert all(reply.ok for reply in pool.request({0: Ping(), 1: Ping()}, "checking").values())
    for sock in intruders:
        sock.close()


def test_two_threads_starting_a_stopped_pool_share_one_start():
    pool = WorkerPool("cpu:2")
    errors, pids = [], []

    def start():
        try:
            pids.append(tuple(pool.start().worker_pids()))
        except Exception as exc:  # noqa: BLE001 (any failure fails the test below)
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors and len(set(pids)) == 1 and len(pids[0]) == 2 and pool.stats.starts == 1
    finally:
        pool.shutdown()


@pytest.mark.parametrize("field", ["timeout_s", "start_timeout_s", "pg_timeout_s"])
@pytest.mark.parametrize("value", [-1, 0, float("nan"), float("inf")])
def test_time_limits_that_would_switch_waiting_off_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number of seconds > 0"):
        WorkerPool("cpu:2", **{field: value})
