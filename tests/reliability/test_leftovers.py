"""No leftovers: a host killed (SIGKILL, SIGTERM, Ctrl-C) with a model loaded or in the middle of shipping one leaves no
worker process, no launcher (runtime/launcher.py) and no file of its pool; a new pool removes folders whose host
process is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallel_backend.runtime import pool_files
from parallel_backend.runtime.pool import WorkerPool

pytestmark = pytest.mark.slow

HOST_SCRIPT = """
import signal, sys, time
import torch
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a host in a terminal: a runner started with '&'
# by a non-interactive shell ignores SIGINT, and its children would inherit that
from parallel_backend.runtime.pool import WorkerPool

from parallel_backend.runtime import launcher

pool = WorkerPool("cpu:2").start()
launchers = [l.process.pid for l in launcher._launchers.values()]  # the CPU workers' (one, on Linux)
print(*pool.worker_pids(), pool._dir, ",".join(map(str, launchers)) or "-", flush=True)
if sys.argv[1] == "loaded":  # a plain torch model: what is loaded matters here, not its family's imports
    pool.ensure_model(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.SiLU()), "diffusers_unet")
    print("loaded", flush=True)
else:  # killed while the weights file is being written and read: a large model keeps it there for a while
    big = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(24)])  # 400 MB
    print("shipping", flush=True)
    pool.ensure_model(big, "diffusers_unet")
time.sleep(120)
"""


def _weights_files(folder: Path) -> list[Path]:
    """The host's weights files (shipping.write), or the one safetensors is writing (a temporary name, renamed
    when whole)."""
    return [*folder.glob("model-*"), *folder.glob(".tmp*")]


def start_host(stage: str):
    host = subprocess.Popen([sys.executable, "-c", HOST_SCRIPT, stage], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = host.stdout.readline().split()
    assert len(first) == 4, host.stderr.read()
    pids, folder = [int(p) for p in first[:2]], Path(first[2])
    assert first[3] != "-" or not sys.platform.startswith("linux"), "no launcher forked the CPU workers"
    pids += [int(p) for p in first[3].split(",") if p != "-"]  # the launcher ends with its host too
    assert host.stdout.readline().strip() == stage.replace("mid-load", "shipping")
    if stage == "mid-load":
        deadline = time.monotonic() + 60
        while not _weights_files(folder) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _weights_files(folder), "the weights file never appeared"
    return host, pids, folder


@pytest.mark.parametrize("stage", ["loaded", "mid-load"])
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_killed_host_leaves_no_process_and_no_file(how, stage, procs):
    host, pids, folder = start_host(stage)
    try:
        host.send_signal(how)
        host.wait(timeout=30)
        assert procs.orphans(pids, 10) == [], f"orphan workers (or launcher) after {how.name}"
        assert procs.removed(folder, 10), f"{folder} left after {how.name}: {sorted(p.name for p in folder.iterdir())}"
    finally:
        host.kill()


def test_a_new_pool_removes_folders_whose_host_is_gone(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = Path(pool_files.temp_root() or "/tmp")
    stale = root / f"{pool_files.PREFIX}{dead.pid}-test"
    stale.mkdir()
    (stale / pool_files.STAMP).write_text(f"{dead.pid} 12345.000")
    (stale / "model-0123.pt").write_bytes(b"\0" * 1024)
    mine = pool_files.make_pool_folder()  # this process's: alive, so it stays
    reused = root / f"{pool_files.PREFIX}{os.getpid()}-reused"  # this pid, another process's start time
    reused.mkdir()
    (reused / pool_files.STAMP).write_text(f"{os.getpid()} 1.000")
    try:
        with WorkerPool("cpu:1") as pool:
            assert pool._dir.exists()
        assert not stale.exists() and not reused.exists() and mine.exists()
    finally:
        for folder in (stale, mine, reused):
            pool_files.shutil.rmtree(folder, ignore_errors=True)
