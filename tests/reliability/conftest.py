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


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


@pytest.fixture
def procs():
    """gone(pid), orphans(pids, seconds), rss(pid)."""
    return SimpleNamespace(gone=gone, orphans=orphans, rss=rss)
