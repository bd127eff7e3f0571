"""Floods against `tandem worker serve` (issue 28, item 1; runtime/doorway.py): it cannot be knocked over.

- 1,000 silent connections and 100 that complete TLS and then send a byte every 4 s (`intruders.py --flood`) while
  a job runs across the two machines: the job equals one device without a restart, serve stays up, each
  connection is closed at once (beyond the 64 handshakes under way) or at the handshake's deadline (none is held
  longer), serve's open descriptors stay within 64 of their level and come back to it, and the log says it in a few
  lines, not a line per connection. This full size runs in about a minute on a loaded 2-core machine.
- serve under a limit of 64 open descriptors (`prlimit`), flooded by more silent connections than it can take:
  accept() fails with "Too many open files", which serve survives and says, and once the flood is dropped it
  serves the next job.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from .conftest import REMOTE_IP, REPO, SERVE_PORT, environment, finish_host, read_line

INTRUDERS = Path(__file__).with_name("intruders.py")
DEVICES = f"cpu:1,{REMOTE_IP}:{SERVE_PORT}/cpu:1"
ATOL = 1e-4  # fp32 on CPU (TESTING.md)
HANDSHAKE_TIMEOUT_S = 10.0  # doorway.HANDSHAKE_TIMEOUT_S
MAX_HANDSHAKES = 64  # doorway.MAX_HANDSHAKES
SLACK_S = 5.0  # a loaded 2-core machine
OPEN_FILES = 64


@pytest.fixture
def serve_log(tmp_path):
    return tmp_path / "serve.log"


@pytest.fixture
def started():
    """The processes a test starts (serve, the host, the flood): killed if still running, and reaped, at its end."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in reversed(processes):
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def _serve_pid(machines) -> int:
    """The pid of the `tandem worker serve` interpreter in namespace B."""
    for pid in machines.pids(machines.b):
        try:
            command = psutil.Process(pid).cmdline()
        except psutil.Error:
            continue
        if "serve" in command and "parallel_backend.commands.cli" in command and "prlimit" not in command[0]:
            return pid
    raise AssertionError(f"no tandem worker serve in namespace B: {machines.pids(machines.b)}")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _back_to(pid: int, level: int, wait_s: float) -> int:
    """serve's open descriptors once they are back to `level` (or what they are after `wait_s`)."""
    until = time.monotonic() + wait_s
    while (now := _fds(pid)) > level and time.monotonic() < until:
        time.sleep(0.2)
    return now


def _flood(machines, silent: int, trickling: int, watch_s: float) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", machines.a, sys.executable, str(INTRUDERS), "--flood",
                             f"{REMOTE_IP}:{SERVE_PORT}", str(silent), str(trickling), str(watch_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(), cwd=REPO)


class PeakDescriptors:
    """The most descriptors process `pid` held, sampled every 50 ms while the block runs."""

    def __init__(self, pid: int):
        import threading

        self.pid, self.peak, self._done = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            try:
                self.peak = max(self.peak, _fds(self.pid))
            except OSError:
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join(timeout=5)


def test_a_flood_of_silent_and_trickling_connections_while_a_job_runs(machines, serve_log, tmp_path, started):
    started.append(process := machines.serve(serve_log))
    pid = _serve_pid(machines)
    idle = _fds(pid)
    hold = tmp_path / "release"
    started.append(host := machines.host(DEVICES, "--strategies", "batch", "--hold", str(hold)))
    assert read_line(host, 240)["max_diff"] <= ATOL
    assert read_line(host, 60)["event"] == "holding"
    serving = _fds(pid)  # the host's session: its connection, the worker's files
    with PeakDescriptors(pid) as descriptors:
        started.append(flood := _flood(machines, 1000, 100, watch_s=60))
        assert read_line(flood, 180)["event"] == "open"
        hold.write_text("")  # the next job runs while the flood's connections are held and trickle
        after = read_line(host, 240)
        outcome = read_line(flood, 120)
    assert after.get("after_hold") is not None and after["after_hold"] <= ATOL, after
    assert after["starts"] == 1, after  # no restart: the session with serve went on
    finish_host(host)
    assert process.poll() is None, f"tandem worker serve ended: {serve_log.read_text()[-3000:]}"
    for kind, seen in outcome.items():
        assert seen["held"] == 0, outcome  # none held beyond the deadline
        assert max(seen["dropped_s"], default=0) <= HANDSHAKE_TIMEOUT_S + SLACK_S, outcome
        assert seen["turned_away"] > 0, outcome  # beyond the bound: closed at once
    assert outcome["trickling"]["dropped_s"], outcome  # tricklers got in, and were dropped at the deadline
    assert descriptors.peak <= serving + MAX_HANDSHAKES + 8, (descriptors.peak, serving)
    assert _back_to(pid, idle, HANDSHAKE_TIMEOUT_S + SLACK_S) <= idle, (_fds(pid), idle)
    text = serve_log.read_text()
    flood_lines = [line for line in text.splitlines() if "turned away" in line or "refused" in line]
    assert any("turned away" in line for line in flood_lines), text[-3000:]
    assert len(flood_lines) < 60, f"{len(flood_lines)} lines for {1100} connections"  # a few, not one each


def test_running_out_of_descriptors_is_survived_said_and_the_next_job_served(machines, serve_log, started):
    started.append(process := machines.serve(serve_log, open_files=OPEN_FILES))
    pid = _serve_pid(machines)
    idle = _fds(pid)
    assert idle < OPEN_FILES // 2, idle
    started.append(flood := _flood(machines, 2 * OPEN_FILES, 0, watch_s=4 * HANDSHAKE_TIMEOUT_S))
    assert read_line(flood, 180)["event"] == "open"
    outcome = read_line(flood, 120)
    assert outcome["silent"]["held"] == 0, outcome
    assert process.poll() is None, f"tandem worker serve ended: {serve_log.read_text()[-3000:]}"
    assert "Too many open files" in serve_log.read_text(), serve_log.read_text()[-3000:]
    assert _back_to(pid, idle, HANDSHAKE_TIMEOUT_S + SLACK_S) <= idle, (_fds(pid), idle)
    started.append(host := machines.host(DEVICES, "--strategies", "batch"))  # the next job
    line = read_line(host, 240)
    assert line["max_diff"] <= ATOL and line["shipped"] > 0, line
    finish_host(host)
    assert process.poll() is None
