"""A machine left out of the pool that is frozen (its `tandem worker serve` stopped: the kernel still takes a
connection, nothing answers it) costs each later job no more than the rejoin probe's time (remote.REJOIN_PROBE_S),
on loopback and across two network namespaces; the jobs run on the devices that are there and equal one
device."""

from __future__ import annotations

import os
import signal
import socket
import time

from parallel_backend.runtime import remote
from parallel_backend.runtime.secure import read_secret

from .conftest import REMOTE_IP, SERVE_PORT, read_line

ATOL = 1e-4  # fp32 on CPU (TESTING.md)
DEADLINE_S = 20.0 + 10.0  # the reliability deadline (hang floor) + 10 s
DEVICES = f"cpu:1,{REMOTE_IP}:{SERVE_PORT}/cpu:1"
DELAY_BOUND_S = 2.5  # issue 28: each later job delayed no more than this by a frozen machine


def test_the_rejoin_probe_gives_up_on_a_frozen_daemon_within_its_time(tmp_path):
    """A listener that never accepts: the kernel completes the connection (its backlog), the TLS handshake never
    starts. The probe says no within its own time, not the daemon handshake's 10 s."""
    secret = tmp_path / "secret"
    secret.write_text(os.urandom(32).hex())
    with socket.create_server(("127.0.0.1", 0), backlog=8) as frozen:
        started = time.monotonic()
        assert not remote.answers(f"127.0.0.1:{frozen.getsockname()[1]}", read_secret(secret))
        took = time.monotonic() - started
    assert took <= remote.REJOIN_PROBE_S + 0.3, took


def test_a_frozen_machine_delays_each_later_job_by_at_most_the_probe(machines, tmp_path):
    """The remote machine is lost mid-job (its daemon killed), comes back frozen (restarted, then SIGSTOP): every
    later job tries it (TANDEM_REJOIN_S=0) for no more than DELAY_BOUND_S, runs on the host's device and equals
    one device. (The job's whole time beyond the one-device run is checked loosely: on a loaded 2-core machine a
    pool's round trips add their own second.)"""
    serve = machines.serve(tmp_path / "serve.log")
    resume, rejoin = tmp_path / "resume", tmp_path / "rejoin"
    host = machines.host(DEVICES, "--strategies", "batch", "--fault-steps", "500", "--resume", str(resume),
                         "--rejoin", str(rejoin), "--later", "2", TANDEM_REJOIN_S="0")
    frozen = None
    try:
        assert read_line(host, 240)["max_diff"] <= ATOL
        assert read_line(host, 60)["event"] == "running"
        time.sleep(1.0)
        serve.kill()
        outcome = read_line(host, DEADLINE_S + 30)
        assert outcome["error"] and f"{REMOTE_IP}:{SERVE_PORT}" in outcome["error"], outcome
        resume.write_text("")
        after = read_line(host, 240)
        assert after["next"] == "ok" and after["devices"] == ["cpu"], after
        frozen = machines.serve(tmp_path / "serve-frozen.log")
        os.kill(frozen.pid, signal.SIGSTOP)
        rejoin.write_text("")
        for key in ("rejoin", "later", "later"):
            job = read_line(host, 120)
            assert job[key] == "ok" and job["max_diff"] <= ATOL and job["devices"] == ["cpu"], job
            assert 0 < job["probe_seconds"] <= DELAY_BOUND_S, job  # tried, and no longer than the probe's time
            # the whole job: well short of the daemon handshake's 10 s that a frozen machine used to cost
            assert job["seconds"] - job["reference_seconds"] < remote.HANDSHAKE_TIMEOUT_S - 2, job
        assert read_line(host, 60)["event"] == "done"
    finally:
        host.kill()
        host.wait(timeout=30)
        for process in (serve, frozen):
            if process is not None and process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.kill()
                process.wait(timeout=30)
