"""A pool across two 'machines' (network namespaces, conftest.py): the exact strategies equal one device, only
the configured listeners exist, intruders are refused (garbage and silent connections to every listener, the
pool's own and gloo's, are survived) while the pool keeps working, and a remote machine that
is killed or whose link drops gives a clear error in time, with no process left on either side. A configuration
error (a wrong secret, a missing or wrong interface) fails the command in one sentence before any model loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import HOST_IP, REMOTE_IP, REPO, SERVE_PORT, environment, listeners, read_line

INTRUDERS = Path(__file__).with_name("intruders.py")

ATOL = 1e-4  # fp32 on CPU (TESTING.md)
HANDSHAKE_TIMEOUT_S = 10.0  # transport.HANDSHAKE_TIMEOUT_S
DEADLINE_S = 20.0 + 10.0  # the reliability deadline (hang floor) + 10 s
DEVICES = f"cpu:1,{REMOTE_IP}:{SERVE_PORT}/cpu:1"


@pytest.fixture
def serve(machines, tmp_path):
    """A running `tandem worker serve` in namespace B (killed at the end) and its log file."""
    log = tmp_path / "serve.log"
    process = machines.serve(log)
    yield process, log
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def test_strategies_across_machines_equal_one_device_and_intruders_are_refused(machines, serve, tmp_path):
    process, log = serve
    attacks = subprocess.run(["ip", "netns", "exec", machines.a, sys.executable, str(INTRUDERS), REMOTE_IP,
                              str(SERVE_PORT), str(machines.secret)], capture_output=True, text=True, timeout=120,
                             env=environment(), cwd=REPO)
    assert attacks.returncode == 0, attacks.stderr[-3000:]
    refused = json.loads(attacks.stdout.strip().splitlines()[-1])
    for name, outcome in refused.items():
        assert outcome["refused"] and outcome.get("seconds", 0) <= HANDSHAKE_TIMEOUT_S + 5, (name, outcome)
    assert process.poll() is None, "tandem worker serve did not survive the intruders"
    assert log.read_text().count("refused a connection") >= 4, log.read_text()

    hold = tmp_path / "release"
    host = machines.host(DEVICES, "--strategies", "cfg,batch,asyncdiff", "--hold", str(hold))
    try:
        for _ in range(3):
            line = read_line(host, 240)
            assert line["max_diff"] <= ATOL, line
            assert line["shipped"] > 0
        assert read_line(host, 60)["event"] == "holding"
        here, there = listeners(machines, machines.a), listeners(machines, machines.b)
        others = [a for a in here + there if a != f"{REMOTE_IP}:{SERVE_PORT}"]
        sprayed = machines.run_in(machines.a, sys.executable, str(INTRUDERS), "--spray", *others, timeout=60,
                                  env=environment(), cwd=REPO)
        assert sprayed.returncode == 0, sprayed.stderr[-3000:]
        hold.write_text("")
        after = read_line(host, 240)
        assert after.get("after_hold") is not None and after["after_hold"] <= ATOL, (after, sprayed.stdout)
        assert after["starts"] == 1, after  # survived: no restart was needed
        assert read_line(host, 60)["event"] == "done"
    finally:
        host.kill()
        host.wait(timeout=30)
    # Only the configured address: the host's store and gloo on its interface; the daemon and gloo on B's.
    assert here and all(a.startswith(f"{HOST_IP}:") for a in here), here
    assert f"{REMOTE_IP}:{SERVE_PORT}" in there and all(a.startswith(f"{REMOTE_IP}:") for a in there), there
    assert _gone_but(machines, machines.b, process.pid), "workers left in namespace B after the host shut down"


def _gone_but(machines, namespace: str, *allowed: int, wait_s: float = 15.0) -> bool:
    """Every process in `namespace` other than `allowed` (and their `ip netns exec` parents) ends in time."""
    import psutil

    keep = set(allowed)
    for pid in allowed:
        try:
            keep |= {c.pid for c in psutil.Process(pid).children(recursive=False)}
        except psutil.Error:
            pass
    until = time.monotonic() + wait_s
    while time.monotonic() < until:
        if not set(machines.pids(namespace)) - keep:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("fault", ["kill_serve", "link_down"])
def test_a_remote_machine_lost_mid_job_is_a_clear_error_then_left_out_until_it_rejoins(machines, serve, tmp_path,
                                                                                      fault):
    """The job in flight fails in time naming the machine; the next job runs on the host's own device (cfg 2
    re-resolved for one device) and equals one device, with one log line; once the machine is back, the job
    after that runs on both again."""
    process, log = serve
    resume, rejoin = tmp_path / "resume", tmp_path / "rejoin"
    host = machines.host(DEVICES, "--strategies", "batch", "--fault-steps", "500", "--resume", str(resume),
                         "--rejoin", str(rejoin), TANDEM_REJOIN_S="0")  # try the machine at every job's start
    try:
        assert read_line(host, 240)["max_diff"] <= ATOL
        assert read_line(host, 60)["event"] == "running"
        time.sleep(1.0)
        if fault == "kill_serve":
            serve_pids = machines.pids(machines.b)
            os.kill(next(p for p in serve_pids if _is_serve(p)), signal.SIGKILL)
        else:
            machines.run_in(machines.b, "ip", "link", "set", machines.veth_b, "down")
        outcome = read_line(host, DEADLINE_S + 30)
        assert outcome["error"] and outcome["seconds"] <= DEADLINE_S, outcome
        assert f"{REMOTE_IP}:{SERVE_PORT}" in outcome["error"], outcome
        if fault == "kill_serve":
            # no orphan on the remote side: the workers watch the daemon's process
            assert _gone_but(machines, machines.b), machines.pids(machines.b)
        else:
            # the daemon stops the host's workers once the host has been silent too long, and stays up
            assert _gone_but(machines, machines.b, process.pid, wait_s=30), machines.pids(machines.b)
        resume.write_text("")  # the machine is still gone: the next job runs without it
        after = read_line(host, 240)
        assert after["next"] == "ok" and after["max_diff"] <= ATOL, after
        assert after["devices"] == ["cpu"] and after["meshes"] == ["batch (cfg 1 x batch 1)"], after
        left_out = [line for line in after["log"] if "left out" in line]
        assert len(left_out) == 1 and f"{REMOTE_IP}:{SERVE_PORT}/cpu" in left_out[0], after["log"]
        if fault == "kill_serve":
            process = machines.serve(tmp_path / "serve-again.log")
        else:
            machines.run_in(machines.b, "ip", "link", "set", machines.veth_b, "up")
            _wait_for_carrier(machines)
        rejoin.write_text("")
        back = read_line(host, 240)
        assert back["rejoin"] == "ok" and back["max_diff"] <= ATOL, back
        # the remote rank ran: cfg 2 on the two devices, the weights shipped to it again
        assert back["devices"] == ["cpu", f"{REMOTE_IP}:{SERVE_PORT}/cpu"], back
        assert back["meshes"] == ["cfg (cfg 2 x batch 1)"] and back["shipped"] > 0, back
        assert [line for line in back["log"] if "again" in line and f"{REMOTE_IP}:{SERVE_PORT}" in line], back["log"]
        assert read_line(host, 60)["event"] == "done"
        host.wait(timeout=30)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait(timeout=30)
        if process.poll() is None and fault == "kill_serve":
            process.kill()
            process.wait(timeout=30)
    assert _gone_but(machines, machines.a), f"processes left in the host's namespace: {machines.pids(machines.a)}"
    assert _gone_but(machines, machines.b, *([process.pid] if process.poll() is None else [])), \
        f"processes left in namespace B: {machines.pids(machines.b)}"
    assert not _pool_folders(host.pid), _pool_folders(host.pid)


def _wait_for_carrier(machines, wait_s: float = 10.0) -> None:
    """Both ends of the veth pair are operationally up again: the kernel has handled the carrier change (its link
    watch runs up to a second after the link came up, and drops what is sent before)."""
    until = time.monotonic() + wait_s
    for namespace, veth in ((machines.a, machines.veth_a), (machines.b, machines.veth_b)):
        while "state UP" not in machines.run_in(namespace, "ip", "link", "show", veth).stdout:
            assert time.monotonic() < until, f"{veth} is not up 10 s after the link came up"
            time.sleep(0.1)


def _pool_folders(pid: int) -> list[str]:
    """The pool folders process `pid` made that still exist (pool_files.PREFIX, in /dev/shm or the temp folder)."""
    import tempfile

    return [str(f) for root in ("/dev/shm", tempfile.gettempdir()) for f in Path(root).glob(f"tandem-pool-{pid}-*")]


def _is_serve(pid: int) -> bool:
    import psutil

    try:
        return "serve" in psutil.Process(pid).cmdline() and "parallel_backend.commands.cli" in psutil.Process(pid).cmdline()
    except psutil.Error:
        return False


# ---- configuration errors fail (issue 28): before any model loads, one sentence, exit 1 -------------------------

MODEL_MODULES = {"generate": "parallel_backend.hosts.pipelines", "bench": "parallel_backend.commands.bench"}


@pytest.fixture
def serve_other_secret(machines, tmp_path):
    """`tandem worker serve` in namespace B reading a secret other than the host's, and its log file."""
    other = tmp_path / "other-secret"
    other.write_text(os.urandom(32).hex())
    log = tmp_path / "serve-other.log"
    process = machines.serve(log, secret=other)
    yield process, log
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def _tandem_in_a(machines, tmp_path, command: str, *args: str, **env) -> tuple[int, list[str], set[str], float]:
    """`tandem COMMAND --devices DEVICES ARGS` in the host's namespace under `python -X importtime`: its exit code,
    its stderr lines (import times left out), the modules it imported and its wall time."""
    options = {"generate": ["--steps", "2", "--out", str(tmp_path / "x.png")],
               "bench": ["--model", "tiny", "--steps", "2", "--repeats", "0", "--no-plan"]}[command]
    variables = {"TANDEM_SECRET_FILE": str(machines.secret), "TANDEM_INTERFACE": machines.veth_a, **env}
    started = time.monotonic()
    done = machines.run_in(machines.a, sys.executable, "-X", "importtime", "-m", "parallel_backend.commands.cli",
                           command, "--quiet", "--devices", DEVICES, *options, *args, timeout=120, cwd=REPO,
                           env={k: v for k, v in environment(**variables).items() if v is not None})
    seconds = time.monotonic() - started
    lines = done.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    assert not done.stdout.strip(), done.stdout
    return done.returncode, [line for line in lines if not line.startswith("import time:")], imported, seconds


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_a_wrong_secret_fails_the_command_before_the_model_loads(machines, serve_other_secret, tmp_path, command):
    process, log = serve_other_secret
    code, lines, imported, seconds = _tandem_in_a(machines, tmp_path, command)
    machine = f"{REMOTE_IP}:{SERVE_PORT}"
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"tandem: error: {machine}: its `tandem worker serve` refused this host"), lines
    assert "--allow-missing-machines" in lines[0], lines
    assert MODEL_MODULES[command] not in imported and not (tmp_path / "x.png").exists()  # no model was loaded
    assert seconds < 30, seconds  # torch's import on a loaded machine; the refusal itself is at once
    assert process.poll() is None and "refused a connection" in log.read_text(), log.read_text()
    assert "serving host" not in log.read_text()  # no worker was started for it


@pytest.mark.parametrize("interface, fragment", [
    (None, "give the network interface that reaches them (interface=, TANDEM_INTERFACE or --interface, e.g. eth1)"),
    ("tdm-none", "network interface 'tdm-none' (interface=, TANDEM_INTERFACE or --interface) does not exist"),
])
def test_a_missing_or_wrong_interface_fails_the_command_before_torch_is_imported(machines, serve, tmp_path,
                                                                                   interface, fragment):
    process, log = serve
    code, lines, imported, seconds = _tandem_in_a(machines, tmp_path, "generate", TANDEM_INTERFACE=interface)
    assert code == 1 and len(lines) == 1 and fragment in lines[0], lines
    assert "torch" not in imported and seconds < 10, (seconds, sorted(imported)[:20])
    assert f"host {HOST_IP}" not in log.read_text(), log.read_text()  # the machine was never contacted


def test_allow_missing_machines_runs_a_wrong_secret_pool_on_the_host_alone(machines, serve_other_secret):
    host = machines.host(DEVICES, "--strategies", "cfg", TANDEM_ALLOW_MISSING_MACHINES="1")
    try:
        line = read_line(host, 240)
        assert line["max_diff"] <= ATOL, line  # equals one device
        assert line["devices"] == ["cpu"] and line["left_out"] == [f"{REMOTE_IP}:{SERVE_PORT}"], line
        assert read_line(host, 60)["event"] == "done"
    finally:
        if host.poll() is None:
            host.kill()
        host.wait(timeout=30)
