"""The platform layer: each function gives the answer the platform's own call gives, on this machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from parallel_backend.runtime import portable

pytestmark = pytest.mark.pool


def test_process_alive_tells_a_running_process_from_a_finished_or_unknown_one():
    assert portable.process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid no longer names a process
    assert not portable.process_alive(child.pid)
    assert not portable.process_alive(2**31 - 1)  # above every platform's pid limit
    assert not portable.process_alive(0)  # a process group on POSIX, not a process


def test_temp_root_is_dev_shm_only_when_it_is_a_writable_folder(monkeypatch):
    shm_usable = os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
    assert portable.temp_root() == ("/dev/shm" if shm_usable else None)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert portable.temp_root() is None


def test_cpu_peak_memory_is_in_bytes_and_grows_with_an_allocation():
    # A fresh process, so that the peak so far is about what it holds now, not what earlier tests held.
    script = (
        "import torch\n"
        "from parallel_backend.runtime.portable import peak_memory_bytes, reset_peak_memory\n"
        "reset_peak_memory('cpu')\n"
        "before = peak_memory_bytes(torch.device('cpu'))\n"
        "x = torch.ones(50_000_000)\n"  # 200 MB, every page written
        "print(before, peak_memory_bytes('cpu'))\n"
    )
    # Linux keeps a process's peak resident set across exec, so a child of this (large) test process would start
    # with our peak: a small interpreter in between starts the measured one from a small address space.
    relay = f"import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', {script!r}]).returncode)"
    before, after = map(int, _run_python(relay).split())
    assert before > 10 * 2**20  # a python process with torch holds far more than 10 MiB
    assert 180e6 <= after - before <= 400e6, (before, after)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only: VmHWM and clear_refs")
def test_cpu_peak_is_the_process_own_and_resets_on_linux():
    # started straight from this large test process: its own peak must not include ours (ru_maxrss would)
    script = (
        "import torch\n"
        "from parallel_backend.runtime.portable import peak_memory_bytes, reset_peak_memory\n"
        "x = torch.ones(50_000_000)\n"  # 200 MB
        "high = peak_memory_bytes('cpu')\n"
        "del x\n"
        "reset_peak_memory('cpu')\n"
        "print(high, peak_memory_bytes('cpu'))\n"
    )
    ballast = torch.ones(150_000_000)  # 600 MB more in this process before the child starts
    high, after_reset = map(int, _run_python(script).split())
    del ballast
    assert 200e6 <= high < 200e6 + 500 * 2**20  # the child's torch + its 200 MB, not this process's peak
    assert high - after_reset >= 180e6  # the reset forgot the freed 200 MB


def test_cuda_devices_read_and_reset_torch_s_counters(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: calls.append(("peak", device)) or 123)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(("reset", device)))
    assert portable.peak_memory_bytes("cuda:1") == 123
    portable.reset_peak_memory(torch.device("cuda", 1))
    assert calls == [("peak", torch.device("cuda", 1)), ("reset", torch.device("cuda", 1))]


def test_cpu_cores_are_the_affinity_or_every_core(monkeypatch):
    cores = portable.cpu_cores()
    assert cores and cores == sorted(set(cores))
    if hasattr(os, "sched_getaffinity"):
        assert set(cores) == os.sched_getaffinity(0)
        monkeypatch.delattr(os, "sched_getaffinity")
    assert portable.cpu_cores() == list(range(os.cpu_count() or 1))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="this platform cannot pin a process to cores")
def test_pin_to_cores_restricts_the_process():
    script = (
        "import os\n"
        "from parallel_backend.runtime.portable import cpu_cores, pin_to_cores\n"
        "pin_to_cores([cpu_cores()[-1]])\n"
        "print(sorted(os.sched_getaffinity(0)), cpu_cores())\n"
    )
    last = portable.cpu_cores()[-1]
    assert _run_python(script).split() == [f"[{last}]", f"[{last}]"]


def _run_python(script: str) -> str:
    """Runs `script` in a fresh interpreter that imports this checkout's package; returns its stdout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(portable.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout
