"""The host's handle on one worker process: its process, log, heartbeat file and channel, the sentence that says
why the worker stopped answering, and the error that carries it (WorkerError). The pool holds one per worker; remote.py's RemoteWorker subclasses it for a
worker on another machine, whose daemon (serve.py) sends the end of the worker's log (log_tail) to the host."""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .transport import Channel


class WorkerError(RuntimeError):
    """A worker failed or died. The message starts with its device and worker number, then the call."""

    def __init__(self, message: str, device: str = "", rank: int = -1, remote_traceback: str = ""):
        super().__init__(message)
        self.device, self.rank, self.remote_traceback = device, rank, remote_traceback


@dataclass
class WorkerHandle:
    """One worker of a pool: rank, device, process, log and heartbeat files, and its channel once it has joined."""

    rank: int
    device: str
    process: subprocess.Popen
    log_path: Path
    heartbeat: Path
    channel: Channel | None = None
    spawned: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return f"{self.device} (worker {self.rank})"

    def alive(self) -> bool:
        return self.process.poll() is None

    def silent_for(self) -> float:
        """Seconds since the worker last renewed its heartbeat (since it was started, before the first)."""
        try:
            last = self.heartbeat.stat().st_mtime
        except OSError:
            last = self.spawned
        return max(0.0, time.time() - last)

    def stopped(self) -> bool:
        """Its process is stopped (SIGSTOP, a terminal's stop, a debugger): it runs nothing until continued."""
        import psutil

        try:
            return psutil.Process(self.process.pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
        except psutil.Error:
            return False

    def hang_note(self) -> str:
        """Why a live worker does not answer: its process stopped, or frozen without a sign of life."""
        state = "its process is stopped (SIGSTOP or a debugger)" if self.stopped() else "its process is frozen"
        return f"stopped answering: no sign of life for {self.silent_for():.0f} s, {state}"

    def ended_how(self) -> str:
        """How its process ended ("signal SIGKILL", "exit code 1"); "" while it runs."""
        code = self.process.poll()
        if code is None:
            return ""
        return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"

    def fault_note(self) -> str:
        """Why it does not answer, dead or alive."""
        return self.death_note() if not self.alive() else self.hang_note()

    def death_note(self) -> str:
        how = self.ended_how()
        if not how:
            return "connection lost"
        tail = log_tail(self.log_path)
        return f"worker process died ({how})" + (f"; its log ends: {tail}" if tail else "")


def log_tail(path: Path, chars: int = 400) -> str:
    """The last `chars` characters of a worker's log, on one line ("" when the log cannot be read)."""
    try:
        return path.read_text(errors="replace")[-chars:].strip().replace("\n", " | ")
    except OSError:
        return ""
