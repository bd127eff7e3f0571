"""A configuration error of a pool across machines fails, on loopback (no namespaces, no root): a machine that cannot
be reached or refuses the secret fails a pool's first start naming it, and a command says so before it loads a
model; `allow_missing_machines` (--allow-missing-machines, TANDEM_ALLOW_MISSING_MACHINES) runs the pool on what is
left instead, equal to one device. A missing or wrong --interface and a --listen that does not resolve are refused
in one sentence naming the option, before torch is imported; --listen takes a name (localhost:PORT).
(tests/multimachine/test_two_machines.py does the same across two network namespaces.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from parallel_backend.commands.cli import build_parser, parallel_config
from parallel_backend.commands.arguments import bench_knobs
from parallel_backend.runtime import remote
from parallel_backend.runtime.addresses import host_settings, listen_address, serve_interface
from parallel_backend.runtime.devices import PoolUnavailable
from parallel_backend.runtime.pool import WorkerPool, loopback_interface
from parallel_backend.runtime.pool_settings import check_environment

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-4  # fp32 on CPU (TESTING.md)
STEPS = 2
PROCESS_SECONDS = 5.0  # a refusal of the arguments, as a process on a loaded machine: the interpreter's start included
VARIABLES = ("TANDEM_SECRET_FILE", "TANDEM_INTERFACE", "TANDEM_ALLOW_MISSING_MACHINES")

needs_lo = pytest.mark.skipif(loopback_interface() != "lo", reason="needs a loopback interface named 'lo' (Linux)")


@pytest.fixture(autouse=True)
def no_machine_variables(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _secret(path: Path) -> Path:
    path.write_text(os.urandom(32).hex())
    return path


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


@pytest.fixture
def daemon(tmp_path):
    """A `tandem worker serve` on loopback in this process, serving cpu:1 with its own secret."""
    from parallel_backend.runtime.serve import ServeDaemon

    serving = ServeDaemon("127.0.0.1:0", "cpu:1", str(_secret(tmp_path / "daemon-secret")), interface="lo",
                          cache_dir=str(tmp_path / "weights"))
    threading.Thread(target=serving.serve_forever, daemon=True).start()
    yield serving
    serving.stop()


# ---- the setting, declared once -------------------------------------------------------------------------------

def test_allow_missing_machines_travels_from_the_cli_to_the_pool(monkeypatch):
    machine = ["--devices", "cpu:1,127.0.0.1:9/cpu:1"]
    args = build_parser().parse_args(["generate", *machine, "--allow-missing-machines"])
    options = parallel_config(args).pool_options()
    assert options["allow_missing_machines"] is True
    assert WorkerPool(args.devices, **options).allow_missing_machines is True  # nothing starts until start()
    assert bench_knobs(build_parser().parse_args(["bench", *machine, "--allow-missing-machines"]))[
        "allow_missing_machines"] is True
    assert build_parser().parse_args(["plan", *machine, "--allow-missing-machines"]).allow_missing_machines is True
    unset = parallel_config(build_parser().parse_args(["generate", *machine]))
    assert unset.allow_missing_machines is None and WorkerPool(unset.devices).allow_missing_machines is False


def test_allow_missing_machines_defaults_to_its_variable(monkeypatch):
    monkeypatch.setenv("TANDEM_ALLOW_MISSING_MACHINES", "1")
    assert WorkerPool("cpu:1").allow_missing_machines is True
    assert WorkerPool("cpu:1", allow_missing_machines=False).allow_missing_machines is False  # an argument wins
    monkeypatch.setenv("TANDEM_ALLOW_MISSING_MACHINES", "0")
    assert WorkerPool("cpu:1").allow_missing_machines is False
    monkeypatch.setenv("TANDEM_ALLOW_MISSING_MACHINES", "yes")
    refusal = r"^TANDEM_ALLOW_MISSING_MACHINES='yes' is not one of: 0, 1$"
    with pytest.raises(ValueError, match=refusal):
        WorkerPool("cpu:1")
    with pytest.raises(ValueError, match=refusal):
        check_environment()


# ---- addresses, checked without starting anything ------------------------------------------------------------

@needs_lo
def test_the_host_settings_are_checked_naming_the_option(tmp_path, monkeypatch):
    secret = _secret(tmp_path / "secret")
    machines = ("127.0.0.1:9",)
    with pytest.raises(ValueError, match=r"give the network interface that reaches them \(interface=, "
                                         r"TANDEM_INTERFACE or --interface, e\.g\. eth1\)"):
        host_settings(machines, str(secret), None)
    with pytest.raises(ValueError, match=r"^network interface 'tdm-none' \(interface=, TANDEM_INTERFACE or "
                                         r"--interface\) does not exist on this machine; interfaces with an IPv4 "
                                         r"address: .*\blo\b"):
        host_settings(machines, str(secret), "tdm-none")
    with pytest.raises(ValueError, match="give the pool's shared secret file"):
        host_settings(machines, None, "lo")
    monkeypatch.setenv("TANDEM_INTERFACE", "lo")
    monkeypatch.setenv("TANDEM_SECRET_FILE", str(secret))
    assert host_settings(machines, None, None) == (str(secret), "lo", secret.read_text().encode())


@needs_lo
def test_listen_takes_a_name_and_refuses_in_one_sentence_naming_listen():
    assert listen_address("localhost:7000") == ("127.0.0.1", 7000)
    assert listen_address("127.0.0.1:0") == ("127.0.0.1", 0)
    with pytest.raises(ValueError, match=r"^--listen 'tdm-nowhere\.invalid:7000': 'tdm-nowhere\.invalid' does not "
                                         r"resolve to an IPv4 address on this machine \("):
        listen_address("tdm-nowhere.invalid:7000")
    with pytest.raises(ValueError, match=r"^--listen '7000': give ADDRESS:PORT or NAME:PORT"):
        listen_address("7000")
    with pytest.raises(ValueError, match=r"^--listen 'localhost:70000': give ADDRESS:PORT"):
        listen_address("localhost:70000")


@needs_lo
def test_listening_on_every_interface_needs_the_interface_named():
    with pytest.raises(ValueError, match=r"^--listen 0\.0\.0\.0:7000 listens on every interface, .* name it with "
                                         r"--interface NAME"):
        serve_interface("0.0.0.0", 7000, None)
    assert serve_interface("0.0.0.0", 7000, "lo") == "lo"
    assert serve_interface("127.0.0.1", 7000, None) == "lo"
    assert serve_interface("127.0.1.1", 7000, None) == "lo"  # a host's own name often resolves there (Debian)
    with pytest.raises(ValueError, match=r"^network interface 'tdm-none' \(--interface\) does not exist"):
        serve_interface("127.0.0.1", 7000, "tdm-none")
    with pytest.raises(ValueError, match=r"^--listen 192\.0\.2\.7:7000: no network interface of this machine holds"):
        serve_interface("192.0.2.7", 7000, None)  # TEST-NET-1: no machine holds it


# ---- a pool's first start -------------------------------------------------------------------------------------

def _job(model, pool, devices: str, strategy: str = "cfg") -> tuple[float, list[str]]:
    """A job on the pool: its largest difference from one device and the meshes its calls ran on."""
    from parallel_backend.engine.config import ParallelConfig
    from parallel_backend.engine.oracle import job_for, run_loop
    from parallel_backend.hosts.executor import ParallelExecutor

    resolution = (model.default_resolution,) * 2
    reference = run_loop(model, job_for(strategy), resolution, STEPS, 0).latents
    result = run_loop(model, job_for(strategy), resolution, STEPS, 0,
                      executor=ParallelExecutor(pool, ParallelConfig(devices, strategy)))
    return (result.latents - reference).abs().max().item(), sorted({c["mesh"].describe() for c in result.calls})


def _children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


@pytest.mark.pool
@needs_lo
def test_a_first_start_fails_naming_a_machine_that_cannot_be_reached(tmp_path):
    machine = f"127.0.0.1:{_free_port()}"  # nothing listens there
    pool = WorkerPool(f"cpu,{machine}/cpu", secret_file=str(_secret(tmp_path / "secret")), interface="lo")
    before, started = _children(), time.monotonic()
    with pytest.raises(PoolUnavailable, match=rf"^{machine}: cannot reach a `tandem worker serve` there .*; the pool "
                                              r"does not start without it \(.*--allow-missing-machines"):
        pool.start()
    assert time.monotonic() - started < remote.REACH_RETRY_S + 5
    assert not pool.started and not pool.left_out and pool.worker_pids() == []
    assert _children() <= before  # no worker was spawned: the machines are reached first


@pytest.mark.pool
@needs_lo
def test_a_wrong_secret_fails_the_first_start_at_once_and_allow_missing_machines_leaves_it_out(daemon, tmp_path):
    from parallel_backend.models.benchmodels import build_bench_model

    machine = f"127.0.0.1:{daemon.port}"
    devices, wrong = f"cpu,{machine}/cpu", str(_secret(tmp_path / "wrong-secret"))
    started = time.monotonic()
    with pytest.raises(PoolUnavailable, match=rf"^{machine}: its `tandem worker serve` refused this host or was "
                                              r"refused .*; the pool does not start without it"):
        WorkerPool(devices, secret_file=wrong, interface="lo").start()
    assert time.monotonic() - started < 3.0  # a refusal is not retried
    pool = WorkerPool(devices, secret_file=wrong, interface="lo", allow_missing_machines=True, start_timeout_s=60)
    try:
        diff, meshes = _job(build_bench_model("tiny"), pool, devices)
        assert diff <= ATOL and meshes == ["batch (cfg 1 x batch 1)"], (diff, meshes)  # the host's device only
        assert pool.devices == ("cpu",) and list(pool.left_out) == [machine]
    finally:
        pool.shutdown()


@pytest.mark.pool
@needs_lo
def test_a_daemon_listening_on_localhost_serves_a_pool(tmp_path):
    from parallel_backend.models.benchmodels import build_bench_model
    from parallel_backend.runtime.serve import ServeDaemon

    secret = str(_secret(tmp_path / "secret"))
    serving = ServeDaemon("localhost:0", "cpu:1", secret, cache_dir=str(tmp_path / "weights"))
    assert (serving.host, serving.interface) == ("127.0.0.1", "lo")
    threading.Thread(target=serving.serve_forever, daemon=True).start()
    devices = f"cpu,localhost:{serving.port}/cpu"
    pool = WorkerPool(devices, secret_file=secret, interface="lo", start_timeout_s=60)
    try:
        diff, meshes = _job(build_bench_model("tiny"), pool, devices)
        assert diff <= ATOL and meshes == ["cfg (cfg 2 x batch 1)"], (diff, meshes)
        assert pool.devices == ("cpu", f"localhost:{serving.port}/cpu") and not pool.left_out
    finally:
        pool.shutdown()
        serving.stop()


# ---- the commands refuse before the model loads ---------------------------------------------------------------

def _tandem(*args: str, **env) -> tuple[int, list[str], set[str], float]:
    """`tandem ARGS` as a process under `python -X importtime`: its exit code, its stderr lines (import times left
    out), the modules it imported and its wall time."""
    environment = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    environment.update(PYTHONPATH=str(ROOT), **env)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "parallel_backend.commands.cli", *args],
                          capture_output=True, text=True, env=environment, cwd=ROOT, timeout=120)
    seconds = time.monotonic() - started
    lines = done.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    return done.returncode, [line for line in lines if not line.startswith("import time:")], imported, seconds


@pytest.mark.pool
@needs_lo
@pytest.mark.parametrize("command, given, fragment", [
    (["generate", "--quiet"], [], "give the network interface that reaches them (interface=, TANDEM_INTERFACE or "
                                  "--interface, e.g. eth1)"),
    (["generate", "--quiet"], ["--interface", "tdm-none"], "network interface 'tdm-none' (interface=, "
                                                           "TANDEM_INTERFACE or --interface) does not exist"),
    (["bench", "--model", "tiny", "--quiet"], ["--interface", "tdm-none"], "network interface 'tdm-none'"),
    (["plan", "--model", "tiny"], [], "give the network interface that reaches them"),
])
def test_a_missing_or_wrong_interface_is_refused_before_torch_is_imported(tmp_path, command, given, fragment):
    secret = str(_secret(tmp_path / "secret"))
    code, lines, imported, seconds = _tandem(*command, "--devices", f"cpu:1,127.0.0.1:{_free_port()}/cpu:1",
                                             "--secret-file", secret, *given)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("tandem: error: ") and fragment in lines[0], lines
    assert "torch" not in imported and seconds < PROCESS_SECONDS, (seconds, sorted(imported)[:20])


@pytest.mark.pool
@needs_lo
@pytest.mark.parametrize("listen, given, fragment", [
    ("0.0.0.0:{port}", [], "--listen 0.0.0.0:{port} listens on every interface"),
    ("tdm-nowhere.invalid:{port}", [], "--listen 'tdm-nowhere.invalid:{port}': 'tdm-nowhere.invalid' does not resolve"),
    ("localhost:{port}", ["--interface", "tdm-none"], "network interface 'tdm-none' (--interface) does not exist"),
])
def test_worker_serve_refuses_its_addresses_before_torch_is_imported(tmp_path, listen, given, fragment):
    port = _free_port()
    code, lines, imported, seconds = _tandem("worker", "serve", "--listen", listen.format(port=port), "--devices",
                                             "cpu:1", "--secret-file", str(_secret(tmp_path / "secret")), *given)
    assert code == 1 and len(lines) == 1 and fragment.format(port=port) in lines[0], lines
    assert "torch" not in imported and seconds < PROCESS_SECONDS, (seconds, sorted(imported)[:20])


@pytest.mark.pool
@needs_lo
@pytest.mark.parametrize("command, model_module", [
    (["generate", "--steps", "2", "--quiet", "--out", "{tmp}/x.png"], "parallel_backend.hosts.pipelines"),
    (["bench", "--model", "tiny", "--steps", "2", "--repeats", "0", "--no-plan", "--quiet"],
     "parallel_backend.commands.bench"),
])
def test_a_machine_that_refuses_the_secret_fails_the_command_before_the_model_loads(daemon, tmp_path, command,
                                                                                    model_module):
    machine = f"127.0.0.1:{daemon.port}"
    args = [arg.format(tmp=tmp_path) for arg in command]
    code, lines, imported, seconds = _tandem(*args, "--devices", f"cpu:1,{machine}/cpu:1", "--interface", "lo",
                                             "--secret-file", str(_secret(tmp_path / "wrong-secret")))
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"tandem: error: {machine}: its `tandem worker serve` refused this host"), lines
    assert "--allow-missing-machines" in lines[0], lines
    assert model_module not in imported and not (tmp_path / "x.png").exists()  # the model never loaded
    assert seconds < 30, seconds  # torch's import, on a loaded machine; the refusal itself takes milliseconds
