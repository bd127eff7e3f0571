"""Two 'machines' for the multi-machine tests: network namespaces joined by a veth pair on 10.213.0.0/24, a
subnet that exists only inside them. The host side runs in namespace A (10.213.0.1), `tandem worker serve` in
namespace B (10.213.0.2). Names are unique per test session; the namespaces (and every process still in
them) are always removed. Without root or `ip netns`, the tests skip and say why.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOST_JOB = Path(__file__).with_name("host_job.py")
HOST_IP, REMOTE_IP = "10.213.0.1", "10.213.0.2"
SERVE_PORT = 7000


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


def environment(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                **extra)


@dataclass
class Machines:
    a: str  # the host's namespace
    b: str  # the remote machine's namespace
    veth_a: str
    veth_b: str
    secret: Path

    def run_in(self, namespace: str, *command: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", namespace, *command], capture_output=True, text=True,
                              timeout=kwargs.pop("timeout", 30), **kwargs)

    def serve(self, log: Path, devices: str = "cpu:1", secret: Path | None = None,
              cores: str | None = None, cache_dir: Path | None = None, cache_gib: float = 1.0,
              open_files: int | None = None) -> subprocess.Popen:
        """`tandem worker serve` in namespace B (on these `cores` only, as taskset's list), once it listens. Its
        weights cache: `cache_dir` (default: a fresh folder beside the log), bounded to `cache_gib`. open_files: its
        limit of open descriptors (the soft one, `prlimit`; its workers inherit it)."""
        pin = ["taskset", "-c", cores] if cores else []
        if open_files is not None:
            pin = ["prlimit", f"--nofile={open_files}:", *pin]
        cache = ["--cache-dir", str(cache_dir or log.with_name(log.stem + "-weights")), "--cache-size", str(cache_gib)]
        with open(log, "wb") as out:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.b, *pin, sys.executable, "-m", "parallel_backend.commands.cli", "worker", "serve",
                 "--listen", f"{REMOTE_IP}:{SERVE_PORT}", "--devices", devices, "--secret-file",
                 str(secret or self.secret), *cache], stdout=out, stderr=subprocess.STDOUT, env=environment(), cwd=REPO)
        deadline = time.monotonic() + 60
        while f"{REMOTE_IP}:{SERVE_PORT}" not in " ".join(listeners(self, self.b)):
            assert process.poll() is None, f"tandem worker serve ended: {log.read_text()}"
            assert time.monotonic() < deadline, f"tandem worker serve did not listen within 60 s: {log.read_text()}"
            time.sleep(0.2)
        return process

    def host(self, *args: str, **env) -> subprocess.Popen:
        """host_job.py in namespace A (stdout: one JSON object per line)."""
        return subprocess.Popen(["ip", "netns", "exec", self.a, sys.executable, str(HOST_JOB), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                env=environment(TANDEM_SECRET_FILE=str(self.secret), TANDEM_INTERFACE=self.veth_a,
                                                **env))

    def pids(self, namespace: str) -> list[int]:
        found = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=20)
        return [int(p) for p in found.stdout.split()]


def listeners(machines: Machines, namespace: str) -> list[str]:
    """The local addresses of the listening TCP sockets in `namespace` (`ss -ltn`)."""
    found = machines.run_in(namespace, "ss", "-ltnH")
    return [line.split()[3] for line in found.stdout.splitlines() if line.strip()]


def read_line(process: subprocess.Popen, timeout_s: float) -> dict:
    """The next JSON line the host script prints (its stderr in the failure message)."""
    if not hasattr(process, "lines"):  # read by a thread: a select() on the pipe misses lines already buffered
        process.lines = queue.Queue()
        threading.Thread(target=lambda: [process.lines.put(line) for line in iter(process.stdout.readline, "")]
                         + [process.lines.put("")], daemon=True).start()
    try:
        line = process.lines.get(timeout=timeout_s)
    except queue.Empty:
        process.kill()
        raise AssertionError(f"the host printed nothing within {timeout_s:g} s: {process.stderr.read()[-3000:]}")
    if not line:
        process.wait(timeout=30)
        raise AssertionError(f"the host ended (code {process.returncode}): {process.stderr.read()[-3000:]}")
    return json.loads(line)


def finish_host(process: subprocess.Popen) -> None:
    """Reads the host script's last line ("done") and waits for it to end."""
    assert read_line(process, 60)["event"] == "done"
    process.wait(timeout=30)


def stop_host(process: subprocess.Popen) -> None:
    """Kills the host script if it still runs (a failed test), and reaps it."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def _kill_all(machines: Machines, namespace: str) -> None:
    for pid in machines.pids(namespace):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def make_machines(secret: Path) -> Machines:
    """Two namespaces joined by a veth pair (HOST_IP in A, REMOTE_IP in B) and a fresh secret at `secret`.
    Raises OSError (subprocess.CalledProcessError included) with what failed; nothing is left then."""
    tag = f"{os.getpid() % 100000}{os.urandom(1).hex()}"
    m = Machines(f"tandem-a-{tag}", f"tandem-b-{tag}", f"tdma{tag}", f"tdmb{tag}", secret)
    m.secret.write_text(os.urandom(32).hex())
    try:
        _ip("netns", "add", m.a)
        _ip("netns", "add", m.b)
        _ip("link", "add", m.veth_a, "type", "veth", "peer", "name", m.veth_b)
        for namespace, veth, address in ((m.a, m.veth_a, HOST_IP), (m.b, m.veth_b, REMOTE_IP)):
            _ip("link", "set", veth, "netns", namespace)
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", veth)
            _ip("-n", namespace, "link", "set", veth, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as exc:
        remove_machines(m)
        detail = (getattr(exc, "stderr", b"") or b"").decode(errors="replace").strip()
        raise OSError(f"{exc}: {detail}") from None
    return m


def remove_machines(m: Machines) -> None:
    """Kills every process left in the two namespaces and removes them (the veth pair goes with them)."""
    for namespace in (m.a, m.b):
        if subprocess.run(["ip", "netns", "pids", namespace], capture_output=True).returncode == 0:
            _kill_all(m, namespace)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=20)
    subprocess.run(["ip", "link", "del", m.veth_a], capture_output=True, timeout=20)


@pytest.fixture(scope="module")
def machines(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root: the two-machine tests run as root (CI does)")
    if shutil.which("ip") is None or shutil.which("ss") is None:
        pytest.skip("the two-machine tests need the `ip` and `ss` commands (iproute2)")
    try:
        m = make_machines(tmp_path_factory.mktemp("secret") / "secret")
    except OSError as exc:
        pytest.skip(f"network namespaces cannot be made here ({exc})")
    try:
        yield m
    finally:
        remove_machines(m)
