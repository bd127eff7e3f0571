"""The reliability suite's fixtures: what it looks at from outside (processes really gone, resident memory)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import psutil
import pytest


def gone(pid: int) -> bool:
    """True once `pid` has ended (a zombie waiting for its parent to reap it counts as ended)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def orphans(pids, seconds: float) -> list[int]:
    """The pids still running after waiting up to `seconds` for all of them to end."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(gone(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if not gone(p)]


def removed(path, seconds: float) -> bool:
    """True once `path` no longer exists, waiting up to `seconds`."""
    deadline = time.monotonic() + seconds
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not path.exists()


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


@pytest.fixture
def procs():
    """gone(pid), orphans(pids, seconds), removed(path, seconds), rss(pid)."""
    return SimpleNamespace(gone=gone, orphans=orphans, removed=removed, rss=rss)


def _refuse_work(*args, **kwargs):
    raise AssertionError("work began before the input was checked (a pool started or a sampler step ran)")


@pytest.fixture
def no_work(monkeypatch):
    """No CUDA, and any pool start, sampler loop, bench run or plan measurement fails the test (the bad-input
    tables: test_bad_input.py, test_bad_input_api.py)."""
    import torch

    from parallel_backend.commands import bench
    from parallel_backend.hosts import diffusers as diffusers_host
    from parallel_backend.hosts import tiny as tiny_pipeline
    from parallel_backend.plan import measure as plan_measure
    from parallel_backend.runtime.pool import WorkerPool

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(WorkerPool, "start", _refuse_work)
    monkeypatch.setattr(WorkerPool, "_start", _refuse_work)
    monkeypatch.setattr(tiny_pipeline, "denoise", _refuse_work)
    monkeypatch.setattr(diffusers_host, "make_scheduler", _refuse_work)
    monkeypatch.setattr(bench, "run_once", _refuse_work)
    monkeypatch.setattr(plan_measure, "measure_inputs", _refuse_work)
    return monkeypatch
