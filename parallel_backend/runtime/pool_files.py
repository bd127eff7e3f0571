"""The pool's temporary folder (rendezvous file, worker logs and heartbeats, weights files while they ship),
and how none is ever left behind.

Each folder is stamped with its host process (pid and start time). It is removed by the pool's shutdown, by
the workers when they see their host gone (worker_watch.py) or the launcher that forked them (launcher.py), on
SIGTERM (`install_sigterm_cleanup`), and by the next pool on this machine for any folder whose host process no
longer exists (`sweep_stale_folders`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .portable import temp_root
from .words import counted

PREFIX = "tandem-pool-"
STAMP = "host"
UNSTAMPED_AGE_S = 24 * 3600.0  # a folder without a stamp (older versions) is stale after this long
log = logging.getLogger("tandem")
_live: dict[int, tuple[list, Path]] = {}  # id(pool) -> (its worker processes, its folder)
_live_lock = threading.Lock()
_sigterm_installed = False


def _identity(pid: int) -> str:
    """pid and start time: a pid reused by a later process does not pass for the host."""
    import psutil

    try:
        return f"{pid} {psutil.Process(pid).create_time():.3f}"
    except psutil.Error:
        return ""


def make_pool_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=temp_root()))
    (folder / STAMP).write_text(_identity(os.getpid()))
    return folder


def _stale(folder: Path) -> bool:
    try:
        stamp = (folder / STAMP).read_text().strip()
    except FileNotFoundError:
        try:
            return time.time() - folder.stat().st_mtime > UNSTAMPED_AGE_S
        except OSError:
            return False
    except OSError:
        return False
    pid = stamp.split(" ", 1)[0]
    return not pid.isdigit() or _identity(int(pid)) != stamp


def sweep_stale_folders(root: str | None = None) -> list[Path]:
    """Removes every pool folder under `root` (default: where pools put theirs) whose host process is gone;
    returns them."""
    root = Path(root or temp_root() or tempfile.gettempdir())
    removed = []
    for folder in root.glob(f"{PREFIX}*"):
        if folder.is_dir() and _stale(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.info("Tandem: removed %s left by pools whose host process is gone: %s", counted(len(removed), "folder"),
                 ", ".join(str(f) for f in removed))
    return removed


def kill_and_remove(processes: list, folder: Path | None) -> None:
    """Kills the processes (stopped ones too), waits for them, removes the folder."""
    for process in processes:
        if process.poll() is None:
            process.kill()
    for process in processes:
        try:
            process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def track(owner: object, processes: list, folder: Path) -> None:
    """A started pool: its processes and folder go on SIGTERM."""
    with _live_lock:
        _live[id(owner)] = (processes, folder)


def untrack(owner: object) -> None:
    with _live_lock:
        _live.pop(id(owner), None)


def install_sigterm_cleanup() -> bool:
    """On SIGTERM, every started pool's workers are killed and its folder removed, then the previous handler
    runs (the default: the process ends by SIGTERM). Only from the main thread, once; a process that ignores
    SIGTERM is left as it is. Returns whether the handler is in place."""
    global _sigterm_installed
    if _sigterm_installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:
        return False

    def on_sigterm(signum, frame):
        with _live_lock:
            pools = list(_live.values())
            _live.clear()
        for processes, folder in pools:
            kill_and_remove(processes, folder)
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    _sigterm_installed = True
    return True
