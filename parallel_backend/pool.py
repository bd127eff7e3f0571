"""WorkerPool: one persistent worker process per device, driven by the host: the processes' lifecycle and
typed requests to them.

The host starts the workers once (`python -m parallel_backend.worker`), ships each model to them once per
fingerprint (shipping.py: a file in shared memory that CPU workers map rather than copy, or CUDA IPC), and
then sends every worker its request (messages.py) and gathers the replies; what the requests are is the
engine's and the strategies' business. Every wait is bounded; a worker that dies is
noticed from its process ending, the error names its device and the call, the pool tears itself down and
starts afresh on the next job. Workers leave with the host (they watch its process).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError
from multiprocessing.connection import wait
from pathlib import Path

from .config import parse_devices, resolve_devices
from .messages import Hello, Ping, Reply, RunSetup, Shutdown, Unload
from .portable import cpu_cores, temp_root
from .shipping import load_requests, model_fingerprint
from .transport import Channel, ChannelClosed, Listener

PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
log = logging.getLogger("tandem")


class WorkerError(RuntimeError):
    """A worker failed or died. The message starts with its device and worker number, then the call."""

    def __init__(self, message: str, device: str = "", rank: int = -1, remote_traceback: str = ""):
        super().__init__(message)
        self.device, self.rank, self.remote_traceback = device, rank, remote_traceback


MAX_FAILURES_KEPT = 20


@dataclass
class PoolStats:
    starts: int = 0  # the first start, then one per restart after a failure
    model_loads: int = 0
    weights_bytes_shipped: int = 0
    calls: int = 0
    refused_connections: int = 0  # connections to the start-up handshake that failed authentication
    last_load_seconds: float = 0.0
    failures: list = field(default_factory=list)  # the latest MAX_FAILURES_KEPT error messages


@dataclass
class _Worker:
    rank: int
    device: str
    process: subprocess.Popen
    log_path: Path
    channel: Channel | None = None

    @property
    def name(self) -> str:
        return f"{self.device} (worker {self.rank})"

    def alive(self) -> bool:
        return self.process.poll() is None

    def death_note(self) -> str:
        code = self.process.poll()
        if code is None:
            return "connection lost"
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        tail = _tail(self.log_path)
        return f"worker process died ({how})" + (f"; its log ends: {tail}" if tail else "")


def _tail(path: Path, chars: int = 400) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip().replace("\n", " | ")
    except OSError:
        return ""


_DETACHED = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if sys.platform == "win32"
             else {"start_new_session": True})


class WorkerPool:
    """A persistent pool of worker processes, one per device.

    devices: "auto", "cpu:2", "cuda:0,cuda:1", ... (see config.parse_devices).
    timeout_s: longest wait for any one reply (dead workers are noticed at once, not by this timeout).
    pg_timeout_s: the workers' process-group timeout: no collective blocks longer on a dead peer.
    interface: the network interface gloo/NCCL bind to (None: this machine's loopback interface).
    import_paths: where workers find the host's model classes (e.g. ComfyUI's root); they come first on the
      workers' import path, ahead of this package's folder, so nothing here shadows a host module.
    """

    def __init__(self, devices: str | tuple[str, ...] = "auto", *, timeout_s: float = 300.0,
                 start_timeout_s: float = 120.0, pg_timeout_s: float = 60.0, import_paths: tuple[str, ...] = (),
                 worker_setup: tuple[str, str, object] | None = None, interface: str | None = None):
        self.requested_devices = parse_devices(devices)
        for name, value in (("timeout_s", timeout_s), ("start_timeout_s", start_timeout_s),
                            ("pg_timeout_s", pg_timeout_s)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number of seconds > 0; got {value!r}")
        self.import_paths = tuple(import_paths)
        self.interface = interface
        # (python file, function, argument): run in every worker once it has joined, before any model arrives,
        # e.g. to give a host's library the host's settings.
        self.worker_setup = worker_setup
        self.timeout_s, self.start_timeout_s, self.pg_timeout_s = timeout_s, start_timeout_s, pg_timeout_s
        self.stats = PoolStats()
        self._lock = threading.RLock()  # one request at a time: replies are read in order on each channel
        self._workers: list[_Worker] = []
        self._dir: Path | None = None
        self._loaded: str | None = None
        self._finalizer = None
        self.peak_memory: dict[int, int] = {}  # rank -> peak bytes, as of the last call that rank ran

    # ---- lifecycle -------------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return bool(self._workers)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(w.device for w in self._workers) or self.requested_devices

    @property
    def loaded_fingerprint(self) -> str | None:
        """The fingerprint of the model the workers hold, or None."""
        return self._loaded

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def start(self) -> "WorkerPool":
        """Starts the workers if they are not running (idempotent, thread-safe: a second caller waits for the
        first one's start); returns once all joined the group."""
        with self._lock:
            return self._start()

    def _start(self) -> "WorkerPool":
        if self._workers:
            return self
        devices = resolve_devices(self.requested_devices)
        self._dir = Path(tempfile.mkdtemp(prefix="tandem-pool-", dir=temp_root()))
        authkey = secrets.token_bytes(32)
        listener = Listener(authkey)
        try:
            self._spawn(devices, listener.address, authkey)
            self._handshake(listener)
        except BaseException:
            self._teardown()
            raise
        finally:
            listener.close()
        if self.worker_setup is not None:
            path, function, argument = self.worker_setup
            try:
                self.request({w.rank: RunSetup(str(path), function, argument) for w in self._workers},
                             "running the host's worker setup")
            except BaseException:
                self._teardown()
                raise
        self.stats.starts += 1
        # Runs if the pool is garbage-collected or the interpreter exits without shutdown() (Ctrl-C included).
        self._finalizer = weakref.finalize(self, _kill_all, [w.process for w in self._workers], self._dir)
        return self

    def _spawn(self, devices: tuple[str, ...], address, authkey: bytes) -> None:
        n = len(devices)
        cores = cpu_cores()
        per_worker = max(1, len(cores) // n)
        interface = self.interface or loopback_interface()
        for rank, device in enumerate(devices):
            # The host's paths first: the pack's own folders (e.g. a ComfyUI pack's nodes/) never shadow them.
            env = dict(os.environ, TANDEM_AUTHKEY=authkey.hex(),
                       PYTHONPATH=os.pathsep.join(filter(None, [*self.import_paths, os.environ.get("PYTHONPATH"),
                                                                PACKAGE_PARENT])))
            if interface:
                env.update(GLOO_SOCKET_IFNAME=interface, NCCL_SOCKET_IFNAME=interface)
            command = [sys.executable, "-m", "parallel_backend.worker", "--connect", f"{address[0]}:{address[1]}",
                       "--rank", str(rank), "--world", str(n), "--device", device,
                       "--rendezvous", f"file://{self._dir}/rendezvous", "--pg-timeout", str(self.pg_timeout_s),
                       "--host-pid", str(os.getpid())]
            if device == "cpu":
                mine = cores[rank * per_worker:(rank + 1) * per_worker] if len(cores) >= n else cores
                env["OMP_NUM_THREADS"] = str(per_worker)
                command += ["--threads", str(per_worker), "--cpus", ",".join(map(str, mine))]
            log_path = self._dir / f"worker-{rank}.log"
            with open(log_path, "wb") as log:
                # Its own session / process group: the terminal's Ctrl-C goes to the host, which shuts the workers
                # down in order.
                # Started in the pool's own folder: `python -m` puts the working directory first on the import
                # path, and the host's (e.g. this pack's root, with its nodes/) must not shadow host modules.
                process = subprocess.Popen(command, env=env, cwd=self._dir, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=log, **_DETACHED)
            self._workers.append(_Worker(rank, device, process, log_path))

    def _handshake(self, listener: Listener) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        waiting = {w.rank: w for w in self._workers}
        while waiting:
            for w in waiting.values():
                if not w.alive():
                    raise WorkerError(f"{w.name}: failed to start: {w.death_note()}", w.device, w.rank)
            if time.monotonic() > deadline:
                raise WorkerError(f"workers {sorted(waiting)} did not connect within {self.start_timeout_s:g} s")
            try:
                conn = listener.accept(timeout=0.5)
            except TimeoutError:
                continue
            except (AuthenticationError, EOFError, OSError) as exc:
                # Some other local process (garbage, a forged hello, a silent peer): nothing it sent was
                # unpickled; keep waiting for our own workers until the deadline.
                self.stats.refused_connections += 1
                log.warning("Tandem: refused a connection to the pool's handshake (%s: %s)", type(exc).__name__, exc)
                continue
            channel = Channel(conn, "worker")
            hello = channel.recv(timeout=10.0)
            if not isinstance(hello, Hello) or hello.rank not in waiting:
                channel.close()
                continue
            worker = waiting.pop(hello.rank)
            channel.name = worker.name
            worker.channel = channel
        for w in self._workers:  # all connected: now each reports joining the process group
            reply = w.channel.recv(timeout=max(1.0, deadline - time.monotonic()), alive=w.alive)
            if not reply.ok:
                raise WorkerError(f"{w.name}: {reply.error}", w.device, w.rank)

    def shutdown(self) -> None:
        """Stops every worker (politely, then by force) and removes the pool's files. Idempotent."""
        for w in self._workers:
            if w.channel is not None and w.alive():
                try:
                    w.channel.send(Shutdown())
                except ChannelClosed:
                    pass
        self._teardown(grace_s=5.0)

    def _teardown(self, grace_s: float = 0.0) -> None:
        workers, self._workers, self._loaded = self._workers, [], None
        self.peak_memory = {}
        deadline = time.monotonic() + grace_s
        for w in workers:
            try:
                w.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        _kill_all([w.process for w in workers], self._dir)
        for w in workers:
            if w.channel is not None:
                w.channel.close()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._dir = None

    def __enter__(self) -> "WorkerPool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- requests --------------------------------------------------------------------------------------

    def request(self, requests: dict[int, object], what: str, collective: bool = False) -> dict[int, Reply]:
        """Sends each worker (by rank) its request (a message of `messages`), then gathers every Reply.

        A worker that answers with an error leaves the pool as it is (every other reply is still read) and
        raises a WorkerError naming its device and `what` it was doing. A worker that dies, a timeout or an
        interruption tears the pool down (it restarts on the next start()), since replies may be in flight.
        collective: the workers exchange data with each other in this request, so one that fails leaves
        its peers waiting on it: the first error reply tears the pool down at once instead.
        """
        with self._lock:
            self.start()
            workers = {rank: self._workers[rank] for rank in requests}
            try:
                for rank, message in requests.items():
                    workers[rank].channel.send(message)
                replies = self._gather(workers, what, stop_on_error=collective)
            except WorkerError as exc:
                self._note_failure(str(exc))
                self._teardown()
                raise
            except BaseException:
                self._teardown()
                raise
        self.peak_memory.update({rank: r.peak_bytes for rank, r in replies.items() if r.peak_bytes is not None})
        failed = [(rank, reply) for rank, reply in sorted(replies.items()) if not reply.ok]
        if failed:
            rank, reply = failed[0]
            w = workers[rank]
            error = WorkerError(f"{w.name}, {what}: {reply.error}", w.device, w.rank, reply.traceback)
            self._note_failure(str(error))
            if collective:
                with self._lock:
                    self._teardown()
            raise error
        return replies

    def _note_failure(self, message: str) -> None:
        self.stats.failures = [*self.stats.failures[-(MAX_FAILURES_KEPT - 1):], message]

    def _gather(self, workers: dict[int, _Worker], what: str, stop_on_error: bool = False) -> dict[int, Reply]:
        """Every worker's reply (error replies included); raises WorkerError if one dies or time runs out."""
        replies: dict[int, dict] = {}
        pending = dict(workers)
        deadline = time.monotonic() + self.timeout_s
        by_conn = {w.channel.conn: rank for rank, w in pending.items()}
        while pending:
            for conn in wait([w.channel.conn for w in pending.values()], timeout=0.2):
                w = pending.pop(by_conn[conn])
                try:
                    replies[w.rank] = w.channel.recv(timeout=self.timeout_s)
                    if stop_on_error and not replies[w.rank].ok:
                        return replies
                except ChannelClosed:
                    try:
                        w.process.wait(timeout=2.0)  # a closed connection usually means the process is ending
                    except subprocess.TimeoutExpired:
                        pass
                    raise WorkerError(f"{w.name}, {what}: {w.death_note()}", w.device, w.rank) from None
            for w in pending.values():
                if not w.alive():
                    raise WorkerError(f"{w.name}, {what}: {w.death_note()}", w.device, w.rank)
            if pending and time.monotonic() > deadline:
                names = ", ".join(w.name for w in pending.values())
                raise WorkerError(f"{names}, {what}: no answer within {self.timeout_s:g} s")
        return replies

    def ensure_model(self, module, family: str, fingerprint: str | None = None) -> str:
        """Makes every worker hold `module` (a torch.nn.Module of model family `family`); ships its weights
        only when its fingerprint is new. A host that tracks its own weight versions (ComfyUI's patch uuid)
        passes `fingerprint`; otherwise it is computed by model_fingerprint. Returns the fingerprint."""
        fingerprint = fingerprint or model_fingerprint(module, family)
        with self._lock:  # check and load as one step: another thread may release or load meanwhile
            self.start()
            if fingerprint == self._loaded:
                return fingerprint
            started = time.perf_counter()
            requests, path, shipped = load_requests(module, family, fingerprint, self._workers, self._dir)
            try:
                self.request(requests, "loading the model")
            finally:
                if path is not None:
                    path.unlink(missing_ok=True)  # workers keep their mappings; the file need not outlive the load
            self._loaded = fingerprint
            self.stats.model_loads += 1
            self.stats.weights_bytes_shipped += shipped
            self.stats.last_load_seconds = time.perf_counter() - started
        return fingerprint

    def release_models(self) -> None:
        """Drops the model the workers hold (e.g. when the host frees memory)."""
        with self._lock:
            if self._workers:
                self.request({w.rank: Unload() for w in self._workers}, "releasing models")
            self._loaded = None

    def memory(self) -> list[int]:
        """Peak memory per worker, in bytes (CUDA: max allocated; CPU: max resident set)."""
        replies = self.request({w.rank: Ping() for w in self._workers}, "reporting memory")
        return [replies[r].peak_bytes for r in sorted(replies)]


def loopback_interface() -> str | None:
    """The name of this machine's loopback network interface ("lo" on Linux, "lo0" on macOS), or None where
    interfaces have no such name (Windows: gloo then picks the interface of the host name)."""
    import socket

    try:
        names = [name for _, name in socket.if_nameindex()]
    except (AttributeError, OSError):
        return None
    return next((name for name in ("lo", "lo0") if name in names), None)


def _kill_all(processes: list, folder: Path | None) -> None:
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
