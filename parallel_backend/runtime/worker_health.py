"""Whether a pool's own workers (of this machine) can take work: looked at before each job, while the pool is
idle (`idle_fault`), while they start (`start_fault`), and after a request failed, for the worker that caused it
(`culprit`). Before a job and at start-up a worker on another machine is judged by its machine's daemon instead
(remote.py), when a request reaches it.

A worker that died, was stopped or froze between two jobs would fail the next job; the pool restarts before it
instead (WorkerPool.before_job). A process group takes no new member, so the whole pool restarts.
"""

from __future__ import annotations

import subprocess
import time

from .deadlines import SILENT_S
from .worker_handle import WorkerError, WorkerHandle

REAPED_WITHIN_S = 1.0  # a process gone from the system is reported ended by its parent within this


def _local(w: WorkerHandle) -> bool:
    return "/" not in w.device  # "HOST:PORT/DEVICE": a worker of another machine


def _gone(w: WorkerHandle) -> bool:
    """Its process has ended; one the system no longer runs (a zombie) is waited on until its parent says how."""
    if not w.alive():
        return True
    import psutil

    try:
        if psutil.Process(w.process.pid).status() != psutil.STATUS_ZOMBIE:
            return False
    except psutil.NoSuchProcess:
        pass
    except psutil.Error:
        return False
    try:  # killed a moment ago: the launcher (or this process) reaps it within moments and says how
        w.process.wait(timeout=REAPED_WITHIN_S)
    except subprocess.TimeoutExpired:
        pass
    return True


def _frozen(w: WorkerHandle) -> bool:
    """No heartbeat for SILENT_S, and none for SILENT_S more (an idle worker renews it twice a second: a machine
    too busy for a moment is not mistaken for a frozen one)."""
    until = time.monotonic() + SILENT_S
    while w.silent_for() > SILENT_S:
        if time.monotonic() > until:
            return True
        time.sleep(0.1)
    return False


def idle_fault(workers: list[WorkerHandle]) -> str | None:
    """The first of this machine's `workers` that cannot take the next job, and why, in words ("cpu (worker 1)
    died (signal SIGKILL)"), or None when every one can. The pool is idle: no request is in flight."""
    for w in filter(_local, workers):
        if _gone(w):
            return f"{w.name} died ({w.ended_how() or 'its process is gone'})"
        if w.stopped():
            return f"{w.name} was stopped (SIGSTOP or a debugger)"
        if w.silent_for() > SILENT_S and _frozen(w):
            return f"{w.name} froze (no sign of life for {w.silent_for():.0f} s)"
    return None


def culprit(workers: list[WorkerHandle], exclude: int = -1, wait_s: float = 0.0) -> WorkerHandle | None:
    """A worker (other than rank `exclude`) that is dead or shows no sign of life, looking for up to `wait_s`
    (a peer's error can arrive before the dying process has ended); None if every one is running."""
    until = time.monotonic() + wait_s
    while True:
        for w in workers:
            if w.rank != exclude and (not w.alive() or w.silent_for() > SILENT_S):
                return w
        if time.monotonic() >= until:
            return None
        time.sleep(0.1)


def start_fault(w: WorkerHandle) -> str | None:
    """Why worker `w` will not finish starting, or None while it may: its process ended, or is stopped with no
    sign of life for SILENT_S (a worker renews its heartbeat from before its imports)."""
    if not w.alive():
        return w.death_note()
    if _local(w) and w.silent_for() > SILENT_S and w.stopped():
        return f"its process is stopped (SIGSTOP or a debugger), no sign of life for {w.silent_for():.0f} s"
    return None


def start_error(workers, also: str = "") -> WorkerError | None:
    """The error for the first of `workers` that will not finish starting (start_fault), or None; `also`: what
    else the start saw (strangers at its listener), appended."""
    for w in workers:
        why = start_fault(w)
        if why is not None:
            return WorkerError(f"{w.name}: failed to start: {why}{also}", w.device, w.rank)
    return None
