"""A pool that heals between jobs and leaves nothing behind: a worker killed or stopped while the pool is idle
restarts the pool before the next job, which then equals one device; a worker stopped during start-up is named
as stopped; a stopped worker under a killed host, and the workers of a host killed right after spawning them,
leave no process and no pool folder (runtime/worker_watch.py, runtime/launcher.py)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from parallel_backend.engine.config import ParallelConfig
from parallel_backend.models.sampling import GenerationRequest
from parallel_backend.runtime import pool as pool_module
from parallel_backend.runtime.messages import Ping
from parallel_backend.runtime.pool import WorkerError, WorkerPool

pytestmark = pytest.mark.slow

FORK = pytest.mark.parametrize("fork", ["1", "0"], ids=["forked", "spawned"])  # launcher.py, or an interpreter each


def _wait_stopped(pid: int, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while psutil.Process(pid).status() != psutil.STATUS_STOPPED:
        assert time.monotonic() < deadline, f"process {pid} never stopped"
        time.sleep(0.02)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_a_worker_lost_between_jobs_restarts_the_pool_and_the_next_job_succeeds(how, digits_pipeline, procs,
                                                                                caplog):
    caplog.set_level(logging.WARNING, logger="tandem")
    pool = WorkerPool("cpu:2", timeout_s=300)  # long: the next job must not wait for a deadline to notice
    config = ParallelConfig("cpu:2", "cfg")
    request = GenerationRequest("a handwritten 3", steps=5, cfg=4.0)
    try:
        with digits_pipeline.parallel(config, pool=pool) as parallel:
            first = parallel.generate(request, progress=False).latents
            victim = pool.worker_pids()[1]
            os.kill(victim, how)
            if how == signal.SIGSTOP:
                _wait_stopped(victim)
            else:
                assert procs.orphans([victim], 5) == []
            started = time.monotonic()
            second = parallel.generate(request, progress=False).latents
            took = time.monotonic() - started
        said = [r.getMessage() for r in caplog.records if "while the pool was idle" in r.getMessage()]
        why = "died (signal SIGKILL)" if how == signal.SIGKILL else "was stopped (SIGSTOP or a debugger)"
        assert said == [f"Tandem: cpu (worker 1) {why} while the pool was idle; the pool restarts"], said
        assert pool.stats.idle_restarts == 1 and pool.stats.starts == 2 and not pool.stats.failures
        assert victim not in pool.worker_pids() and procs.orphans([victim], 5) == []  # the stopped one too
        assert took < 60, f"the healed job took {took:.0f} s"
        torch.testing.assert_close(second, first, atol=0, rtol=0)
        torch.testing.assert_close(second, digits_pipeline.generate(request, progress=False).latents,
                                   atol=1e-4, rtol=1e-4)
    finally:
        pool.shutdown()


def test_a_healthy_pool_is_not_restarted_between_jobs(cpu_pool):
    from parallel_backend.runtime import worker_health

    assert worker_health.idle_fault(cpu_pool._workers) is None
    late = time.time() - 10  # a heartbeat that looks old (a machine too busy for a moment) but is renewed
    os.utime(cpu_pool._workers[1].heartbeat, (late, late))
    assert cpu_pool._workers[1].silent_for() > 9 and worker_health.idle_fault(cpu_pool._workers) is None
    assert cpu_pool.before_job("job a") is False and cpu_pool.before_job("job b") is False
    assert cpu_pool.stats.idle_restarts == 0 and cpu_pool.started


@FORK
def test_a_worker_stopped_during_start_up_is_named_as_stopped(fork, monkeypatch, procs):
    monkeypatch.setenv("TANDEM_FORK_WORKERS", fork)
    spawn, stopped = pool_module.spawn_worker, []

    def spawn_and_stop_worker_1(rank, *args, **kwargs):
        process, log_path = spawn(rank, *args, **kwargs)
        if rank == 1:
            os.kill(process.pid, signal.SIGSTOP)
            stopped.append(process.pid)
        return process, log_path

    monkeypatch.setattr(pool_module, "spawn_worker", spawn_and_stop_worker_1)
    pool = WorkerPool("cpu:2", start_timeout_s=120)
    started = time.monotonic()
    with pytest.raises(WorkerError, match=r"^cpu \(worker 1\): failed to start: its process is stopped \(SIGSTOP"):
        pool.start()
    took = time.monotonic() - started
    assert took < 30, f"named after {took:.0f} s, not long before the 120 s start timeout"
    assert not pool.started and procs.orphans(stopped, 5) == []


@FORK
def test_a_pool_started_from_a_thread_that_ends_keeps_its_workers(fork, monkeypatch):
    # A parent-death signal follows the thread that started the process: it must not end a live host's workers.
    monkeypatch.setenv("TANDEM_FORK_WORKERS", fork)
    pool = WorkerPool("cpu:2")
    try:
        thread = threading.Thread(target=pool.start)
        thread.start()
        thread.join(timeout=120)
        time.sleep(1.5)
        replies = pool.request({0: Ping(), 1: Ping()}, "checking")
        assert [replies[r].value["pid"] for r in (0, 1)] == pool.worker_pids()
        assert pool.before_job("next") is False and pool.stats.starts == 1
    finally:
        pool.shutdown()


HOST = """
import sys, time
from parallel_backend.runtime import launcher, pool as pool_module

def say(pool):  # its folder, its workers' pids and its launcher's (forked workers)
    print(pool._dir, *[w.process.pid for w in pool._workers], *[l.process.pid for l in launcher._launchers.values()],
          flush=True)

spawn = pool_module.WorkerPool._spawn

def spawn_and_say(self, *args, **kwargs):
    spawn(self, *args, **kwargs)
    say(self)

if sys.argv[1] == "spawned":
    pool_module.WorkerPool._spawn = spawn_and_say
pool = pool_module.WorkerPool("cpu:2").start()
if sys.argv[1] == "started":
    say(pool)
time.sleep(3600)
"""


def _host(fork: str, stage: str):
    """A host that prints its pool's folder and the pids of its workers (and launcher) once it has spawned them."""
    host = subprocess.Popen([sys.executable, "-c", HOST, stage], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, TANDEM_FORK_WORKERS=fork))
    line = host.stdout.readline().split()
    assert len(line) >= 3, host.stderr.read()
    return host, Path(line[0]), [int(pid) for pid in line[1:]]


def _kill_host(host, folder: Path, pids: list[int], procs, delay_s: float = 0.0, stop: int | None = None) -> None:
    """Stops worker `stop` first if given, SIGKILLs the host after `delay_s`, then checks that no worker (or
    launcher) runs within 5 s and that the pool's folder is gone."""
    try:
        if stop is not None:
            os.kill(stop, signal.SIGSTOP)
            _wait_stopped(stop)
        time.sleep(delay_s)
        host.kill()
        host.wait(timeout=10)
        assert procs.orphans(pids, 5) == [], "workers (or launcher) left"
        assert procs.removed(folder, 2), f"{folder} left: {sorted(p.name for p in folder.iterdir())}"
    finally:
        host.kill()
        for pid in pids:
            if not procs.gone(pid):
                os.kill(pid, signal.SIGKILL)


@FORK
def test_a_stopped_worker_under_a_killed_host_leaves_nothing(fork, procs):
    host, folder, pids = _host(fork, "started")
    _kill_host(host, folder, pids, procs, stop=pids[1])


@FORK
def test_a_host_killed_right_after_spawning_its_workers_leaves_nothing(fork, procs):
    for delay_s in (0.0, 0.1, 0.2, 0.3):  # between the spawn and the kill
        host, folder, pids = _host(fork, "spawned")
        _kill_host(host, folder, pids, procs, delay_s)
