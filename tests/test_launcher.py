"""CPU workers forked from the preloaded launcher (runtime/launcher.py) against workers started as interpreters of
their own (TANDEM_FORK_WORKERS=0): the same job gives the same latents as one device either way, the forked
workers really are the launcher's children, they start without importing torch or the model's library again, and
a worker's end reaches the host with Popen's return code."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

import psutil
import pytest
import torch

from parallel_backend.engine.config import ParallelConfig
from parallel_backend.engine.oracle import job_for, run_loop
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.runtime import launcher
from parallel_backend.runtime.pool import PACKAGE_PARENT, WorkerPool

pytestmark = [pytest.mark.pool, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork: Linux only")]

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    return build_bench_model("tiny")


def _run(model, monkeypatch, fork: str):
    monkeypatch.setenv("TANDEM_FORK_WORKERS", fork)
    job, resolution = job_for("cfg"), (model.default_resolution,) * 2
    pool = WorkerPool("cpu:2")
    try:
        started = time.monotonic()
        pool.start()
        start_s = time.monotonic() - started
        parents = {psutil.Process(pid).ppid() for pid in pool.worker_pids()}
        result = run_loop(model, job, resolution, steps=4, repeats=0,
                          executor=ParallelExecutor(pool, ParallelConfig("cpu:2", "cfg"))).latents
        assert pool.stats.calls >= 4  # the pool ran
    finally:
        pool.shutdown()
    return result, parents, start_s


def test_forked_and_fresh_workers_give_the_latents_of_one_device(tiny, monkeypatch):
    reference = run_loop(tiny, job_for("cfg"), (tiny.default_resolution,) * 2, steps=4, repeats=0).latents
    forked, forked_parents, _ = _run(tiny, monkeypatch, "1")
    fresh, fresh_parents, _ = _run(tiny, monkeypatch, "0")
    assert len(forked_parents) == 1 and "parallel_backend.runtime.launcher" in psutil.Process(
        forked_parents.pop()).cmdline()
    assert fresh_parents == {os.getpid()}
    torch.testing.assert_close(forked, reference, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(fresh, reference, atol=ATOL, rtol=ATOL)


def test_a_forked_pool_starts_without_importing_torch_again(tiny, monkeypatch):
    _run(tiny, monkeypatch, "1")  # the launcher exists (it started with this process's diffusers modules)
    _, _, start_s = _run(tiny, monkeypatch, "1")
    _, _, fresh_start_s = _run(tiny, monkeypatch, "0")
    print(f"pool start: forked {start_s:.2f} s, fresh interpreters {fresh_start_s:.2f} s")
    assert start_s < fresh_start_s


def test_a_worker_end_reaches_the_host_with_popens_return_code(tmp_path):
    spawn = launcher.launcher_for(_worker_path()).spawn
    env = dict(os.environ, PYTHONPATH=_worker_path())
    bad = spawn(["--no-such-option"], env, str(tmp_path), str(tmp_path / "bad.log"))
    assert bad.wait(timeout=60) == 2 and "usage" in (tmp_path / "bad.log").read_text()  # argparse's exit
    silent = socket.create_server(("127.0.0.1", 0))  # accepts the connection into its backlog, never answers
    try:
        waiting = spawn(["--connect", f"127.0.0.1:{silent.getsockname()[1]}", "--rank", "0", "--world", "1",
                         "--device", "cpu", "--rendezvous", f"file://{tmp_path}/rdzv"],
                        dict(env, TANDEM_AUTHKEY="00" * 32), str(tmp_path), str(tmp_path / "killed.log"))
        time.sleep(0.5)
        assert waiting.poll() is None  # waiting for the host's challenge
        waiting.kill()
    finally:
        silent.close()
    assert waiting.wait(timeout=30) == -signal.SIGKILL and not psutil.pid_exists(waiting.pid)


def _worker_path() -> str:
    """An import path that finds this package (the launcher for it starts on first use)."""
    return os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), PACKAGE_PARENT]))
