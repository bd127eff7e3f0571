"""Strangers at a local pool's start (issue 28, item 5): a client that trickles a byte every few seconds and one
that says nothing, connected to the start-up listener before the workers, delay none of them (each handshake runs
in a thread of its own, bounded as a whole), and each is dropped at the handshake deadline; a start that fails
while strangers keep the listener full names them as such, not a worker."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from parallel_backend.engine.config import ParallelConfig
from parallel_backend.engine.oracle import job_for, run_loop
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.runtime import doorway, transport
from parallel_backend.runtime.pool import WorkerError, WorkerPool

pytestmark = pytest.mark.slow

ATOL = 1e-4  # fp32 on CPU (TESTING.md)
BYTE_EVERY_S = 3.0  # the slow client sent one every 4 to 8 s; under the 10 s a bound per read allowed
SLACK_S = 5.0  # a loaded 2-core machine


class Stranger(threading.Thread):
    """A connection to `address` that reads the listener's challenge, then (trickle=True) announces an answer of 200
    bytes and sends them one every BYTE_EVERY_S, or says nothing; notes when the listener drops it."""

    def __init__(self, address, trickle: bool):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(tuple(address))
        self.port = self.sock.getsockname()[1]
        self.trickle, self.connected, self.dropped_after, self.sent = trickle, time.monotonic(), None, 0
        self._done = threading.Event()

    def run(self) -> None:
        try:
            self.sock.recv(4096)  # the challenge
            if self.trickle:
                self.sock.sendall(struct.pack("!i", 200))
            while not self._done.is_set():
                if self.trickle:
                    self.sock.sendall(b"\x07")
                    self.sent += 1
                self.sock.settimeout(BYTE_EVERY_S)
                try:
                    if self.sock.recv(1) == b"":  # closed by the listener
                        break
                except socket.timeout:
                    continue
        except OSError:
            pass
        if not self._done.is_set():
            self.dropped_after = time.monotonic() - self.connected

    def stop(self) -> None:
        self._done.set()
        self.sock.close()


def _strangers_first(monkeypatch, strangers: list, kinds: tuple[bool, ...], spawned: list) -> None:
    """WorkerPool._spawn preceded by the strangers' connections (trickle=True/False each)."""
    spawn = WorkerPool._spawn

    def spawn_after_strangers(self, devices, address, authkey):
        for trickle in kinds:
            strangers.append(Stranger(address, trickle))
            strangers[-1].start()
        spawn(self, devices, address, authkey)
        spawned.extend(w.process.pid for w in self._workers)

    monkeypatch.setattr(WorkerPool, "_spawn", spawn_after_strangers)


def test_a_slow_and_a_silent_stranger_delay_no_worker_and_the_first_job_equals_one_device(monkeypatch):
    strangers, spawned = [], []
    _strangers_first(monkeypatch, strangers, (True, False), spawned)
    model = build_bench_model("tiny")
    resolution = (model.default_resolution,) * 2
    job = job_for("cfg")
    reference = run_loop(model, job, resolution, 2, 0).latents
    pool = WorkerPool("cpu:2", start_timeout_s=60)
    try:
        pool.start()  # before this change: handshakes one at a time, stuck behind the trickler, failed at 60 s
        result = run_loop(model, job, resolution, 2, 0, executor=ParallelExecutor(pool, ParallelConfig("cpu:2", "cfg")))
        assert (result.latents - reference).abs().max().item() <= ATOL
        assert pool.stats.starts == 1
        for stranger in strangers:  # each dropped at the handshake's deadline, the trickler still trickling
            stranger.join(timeout=transport.HANDSHAKE_TIMEOUT_S + 2 * SLACK_S)
            assert stranger.dropped_after is not None, "a stranger was never dropped"
            assert stranger.dropped_after <= transport.HANDSHAKE_TIMEOUT_S + SLACK_S, stranger.dropped_after
        assert strangers[0].sent >= 3  # it kept sending: a bound per read would never have dropped it
    finally:
        pool.shutdown()
        for stranger in strangers:
            stranger.stop()


def test_a_start_failing_while_strangers_keep_the_listener_full_names_them_not_a_worker(monkeypatch, procs):
    monkeypatch.setattr(doorway, "MAX_HANDSHAKES", 2)  # two strangers fill the start-up listener...
    monkeypatch.setattr(transport, "HANDSHAKE_TIMEOUT_S", 120.0)  # ... for longer than the start may take
    strangers, spawned = [], []
    _strangers_first(monkeypatch, strangers, (True, False), spawned)
    pool = WorkerPool("cpu:2", start_timeout_s=20)  # under the workers' retries (doorway.RETRY_TURNED_AWAY_S)
    try:
        with pytest.raises(WorkerError) as caught:
            pool.start()
    finally:
        pool.shutdown()
        for stranger in strangers:
            stranger.stop()
    message = str(caught.value)
    for stranger in strangers:
        assert f"a connection from 127.0.0.1:{stranger.port} that never completed the handshake" in message, message
    assert "no worker of this pool" in message and "turned away" in message, message
    assert caught.value.rank == -1 and caught.value.device == "", "a worker was blamed"  # the workers were kept out
    assert procs.orphans(spawned, 10) == []
