"""A pool naming another machine that cannot be reached, on loopback (no namespaces, no root): its first start fails
naming the machine (tests/test_machine_settings.py); with allow_missing_machines it starts with
the devices that are there and says so in one log line, its jobs equal one device, it tries the machine again
at most once per job and no more often than TANDEM_REJOIN_S, and once a `tandem worker serve` answers there the
next job runs on every device; the probe that tries it keeps to its time. No device left is a clear error. (tests/multimachine/test_two_machines.py
does the same across two network namespaces, with the machine lost mid-job.)"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from parallel_backend.runtime import remote
from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.engine.config import ParallelConfig
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.engine.oracle import job_for, run_loop
from parallel_backend.runtime.pool import WorkerPool, loopback_interface
from parallel_backend.runtime.portable import temp_root

ATOL = 1e-4  # fp32 on CPU (TESTING.md)
STEPS = 2

pytestmark = pytest.mark.skipif(loopback_interface() != "lo", reason="needs a loopback interface named 'lo' (Linux)")


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "secret"
    path.write_text(os.urandom(32).hex())
    return path


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def _job(model, pool, devices: str, strategy: str = "cfg", **knobs) -> tuple[float, list[str]]:
    """A job on the pool: its largest difference from one device and the meshes its calls ran on."""
    resolution = (model.default_resolution,) * 2
    reference = run_loop(model, job_for(strategy), resolution, STEPS, 0).latents
    result = run_loop(model, job_for(strategy), resolution, STEPS, 0,
                      executor=ParallelExecutor(pool, ParallelConfig(devices, strategy, **knobs)))
    return (result.latents - reference).abs().max().item(), sorted({c["mesh"].describe() for c in result.calls})


def _my_pool_folders() -> list:
    """This process's pool folders (pool_files.PREFIX + its pid), the pool's and the in-process daemon's."""
    root = Path(temp_root() or tempfile.gettempdir())
    return sorted(root.glob(f"tandem-pool-{os.getpid()}-*"))


def test_a_machine_that_cannot_be_reached_is_left_out_until_it_answers(secret_file, monkeypatch, caplog):
    port = _free_port()  # nothing listens there yet
    machine = f"127.0.0.1:{port}"
    devices = f"cpu,{machine}/cpu"
    attempts = []
    answers = remote.answers
    monkeypatch.setattr(remote, "answers", lambda *args: attempts.append(args[0]) or answers(*args))
    monkeypatch.setenv("TANDEM_REJOIN_S", "3600")
    model = build_bench_model("tiny")
    before = _my_pool_folders()  # another test's pool in this process may hold one
    pool = WorkerPool(devices, secret_file=str(secret_file), interface="lo", start_timeout_s=60,
                      allow_missing_machines=True)
    daemon = None
    try:
        with caplog.at_level(logging.INFO, logger="tandem"):
            diff, meshes = _job(model, pool, devices)
        assert diff <= ATOL and meshes == ["batch (cfg 1 x batch 1)"], (diff, meshes)  # cfg 2 on the one device left
        assert pool.devices == ("cpu",) and pool.left_out == {machine: (f"{machine}/cpu",)}
        said = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
        assert len(said) == 1 and f"{machine}/cpu" in said[0] and "cannot reach" in said[0], said
        diff, meshes = _job(model, pool, devices, "batch", device_speeds="1,0.5")  # the speed of the device left
        assert diff <= ATOL and meshes == ["batch (cfg 1 x batch 1)"], (diff, meshes)

        from parallel_backend.runtime.serve import ServeDaemon

        daemon = ServeDaemon(f"127.0.0.1:{port}", "cpu:1", str(secret_file), interface="lo")
        threading.Thread(target=daemon.serve_forever, daemon=True).start()
        diff, meshes = _job(model, pool, devices)  # within TANDEM_REJOIN_S of the last attempt: not tried
        assert diff <= ATOL and pool.devices == ("cpu",) and attempts == [], (attempts, pool.devices)

        monkeypatch.setenv("TANDEM_REJOIN_S", "0")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tandem"):
            diff, meshes = _job(model, pool, devices)
        assert attempts == [machine], attempts  # one attempt, at the job's first call only
        assert diff <= ATOL and meshes == ["cfg (cfg 2 x batch 1)"], (diff, meshes)
        assert pool.devices == ("cpu", f"{machine}/cpu") and not pool.left_out
        assert [r for r in caplog.records if "again" in r.getMessage() and machine in r.getMessage()]
    finally:
        pool.shutdown()
        if daemon is not None:
            daemon.stop()
    until = time.monotonic() + 15  # the daemon (in this process) removes its workers' folder once the host left
    while set(_my_pool_folders()) - set(before) and time.monotonic() < until:
        time.sleep(0.1)
    assert _my_pool_folders() == before, _my_pool_folders()


class ProbeClock:
    """remote's clock in the probe tests: it moves only when the probe pauses between attempts, so what the probe
    does within its time is the same however fast this machine refuses a connection or starts a daemon."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def attempts(monkeypatch):
    """The rejoin probe on a ProbeClock: `made`, each connect it makes as (the probe's clock, its connect timeout);
    `after_first`, a function run once, after the first attempt."""
    clock, connect_tls = ProbeClock(), remote.connect_tls
    seen = SimpleNamespace(made=[], after_first=None)

    def attempt(address, secret, timeout_s, connect_timeout_s=None, whole=False):
        seen.made.append((clock.now, connect_timeout_s))
        try:
            return connect_tls(address, secret, timeout_s, connect_timeout_s, whole)
        finally:
            if len(seen.made) == 1 and seen.after_first is not None:
                seen.after_first()

    monkeypatch.setattr(remote, "time", SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep))
    monkeypatch.setattr(remote, "connect_tls", attempt)
    return seen


def test_the_rejoin_probe_keeps_to_its_time_where_nothing_listens(secret_file, attempts):
    """Refused at once, every attempt: tried again every RETRY_PAUSE_S until its time is spent, each connect given
    no more than the time left (a silent address cannot hold it longer)."""
    from parallel_backend.runtime.secure import read_secret

    assert not remote.answers(f"127.0.0.1:{_free_port()}", read_secret(secret_file))
    times = [at for at, _ in attempts.made]
    assert times == [i * remote.RETRY_PAUSE_S for i in range(len(times))], times
    assert remote.REJOIN_PROBE_S - remote.RETRY_PAUSE_S <= times[-1] < remote.REJOIN_PROBE_S, times
    for at, connect_s in attempts.made:
        assert connect_s <= max(remote.REJOIN_PROBE_S - at, remote.MIN_ATTEMPT_S), attempts.made


def test_the_rejoin_probe_retries_a_refused_connection_within_its_time(secret_file, tmp_path, attempts):
    """A machine whose daemon takes connections only part-way into the probe (a link just back up, a daemon just
    restarted) answers: here the daemon binds its port after the probe's first attempt was refused."""
    from parallel_backend.runtime.secure import read_secret
    from parallel_backend.runtime.serve import ServeDaemon

    machine = f"127.0.0.1:{_free_port()}"
    daemons = []

    def serve_late():
        daemons.append(ServeDaemon(machine, "cpu:1", str(secret_file), interface="lo",
                                   cache_dir=str(tmp_path / "weights")))
        threading.Thread(target=daemons[0].serve_forever, daemon=True).start()

    attempts.after_first = serve_late
    try:
        assert remote.answers(machine, read_secret(secret_file))
        assert [at for at, _ in attempts.made] == [0.0, remote.RETRY_PAUSE_S], attempts.made  # refused, then answered
    finally:
        for daemon in daemons:
            daemon.stop()


def test_no_device_left_is_a_clear_error(secret_file):
    machine = f"127.0.0.1:{_free_port()}"
    pool = WorkerPool(f"{machine}/cpu", secret_file=str(secret_file), interface="lo", allow_missing_machines=True)
    before = _my_pool_folders()
    with pytest.raises(RuntimeError, match=f"no device of the pool can be reached: {machine}: cannot reach"):
        pool.start()
    assert not pool.started and not pool.left_out and _my_pool_folders() == before


@pytest.mark.parametrize("value, problem", [("soon", "is not a valid number"), ("-1", "must be 0 or more")])
def test_a_bad_rejoin_interval_is_refused_before_a_start(secret_file, monkeypatch, value, problem):
    monkeypatch.setenv("TANDEM_REJOIN_S", value)
    pool = WorkerPool(f"cpu,127.0.0.1:{_free_port()}/cpu", secret_file=str(secret_file), interface="lo")
    before = _my_pool_folders()
    with pytest.raises(ValueError, match=f"TANDEM_REJOIN_S='{value}' {problem}"):
        pool.start()
    assert not pool.started and _my_pool_folders() == before
