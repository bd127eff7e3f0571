"""A worker's watch on its host: the heartbeat it renews and its exit when the host is gone, started before the
worker imports torch (engine/worker.py; a forked worker right after the fork, launcher.py), so a host killed
while its workers start leaves no worker and no pool folder. Imports nothing heavy: psutil at most.

A stopped process runs no thread, so on Linux the kernel wakes it: a parent-death signal (`follow_parent`) of
SIGCONT lets the watch run and end the process. Not SIGKILL: the kernel sends it when the *thread* that started
the process ends, which in a host that started its pool from a passing thread is no sign of the host's death
(SIGCONT to a running process does nothing), and a killed worker could not remove the pool's folder.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from .portable import process_alive

WATCHDOG_PERIOD_S = 0.5
THREAD_NAME = "tandem-watch"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def heartbeat_path(pool_dir, rank: int) -> Path:
    """The file whose modification time a worker renews every WATCHDOG_PERIOD_S while its process runs: the
    host's sign of life of a worker busy with a request (a stopped or frozen process stops renewing it)."""
    return Path(pool_dir) / f"worker-{rank}.alive"


def host_gone(pid: int) -> bool:
    """The host has ended (a zombie not yet reaped by its parent has ended too)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return not process_alive(pid)


def _leave(pool_dir: Path | None) -> None:
    """The host is gone: nothing of its pool stays behind, this process included."""
    if pool_dir is not None:
        shutil.rmtree(pool_dir, ignore_errors=True)
    os._exit(3)


def _watch(host_pid: int, pool_dir: Path | None, rank: int) -> None:
    beat = heartbeat_path(pool_dir, rank) if pool_dir is not None else None
    while True:
        if beat is not None:
            try:
                beat.touch()
            except OSError:
                pass
        time.sleep(WATCHDOG_PERIOD_S)
        if host_pid and host_gone(host_pid):
            _leave(pool_dir)


def follow_parent(parent_pid: int) -> bool:
    """On Linux, asks the kernel to send this process SIGCONT when its parent `parent_pid` ends (a stopped
    process then runs its watch, which ends it if the host is gone). Returns False where the parent has already
    ended (this process was handed to another before the request) or the platform has no such signal."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGCONT), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return os.getppid() == parent_pid  # checked after the request: a parent that ended before it sent nothing


def start(host_pid: int, pool_dir: str | Path | None, rank: int, parent_pid: int = 0) -> None:
    """Starts the watch thread once per process (a later call finds it running): renews the heartbeat in
    `pool_dir` and, once process `host_pid` (0: none) is gone, removes `pool_dir` and ends this process.
    parent_pid: this process's parent (the host, or the launcher that forked it), followed on Linux."""
    if any(thread.name == THREAD_NAME for thread in threading.enumerate()):
        return
    pool_dir = Path(pool_dir) if pool_dir else None
    if parent_pid and not follow_parent(parent_pid) and host_pid and host_gone(host_pid):
        _leave(pool_dir)
    if host_pid or pool_dir is not None:
        threading.Thread(target=_watch, args=(host_pid, pool_dir, rank), daemon=True, name=THREAD_NAME).start()


def start_from_argv(argv: list[str], parent_pid: int = 0) -> None:
    """`start` with the worker program's own arguments (--host-pid, --pool-dir, --rank), before it imports the
    rest: the parent defaults to the host, which started this process itself."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--host-pid", type=int, default=0)
    parser.add_argument("--pool-dir", default="")
    parser.add_argument("--rank", type=int, default=0)
    args, _ = parser.parse_known_args(argv)
    start(args.host_pid, args.pool_dir, args.rank, parent_pid or args.host_pid)
