"""WorkerPool: one persistent worker process per device, driven by the host: the processes' lifecycle and
typed requests to them.

The host starts the workers once (`python -m parallel_backend.engine.worker`), ships each model to them once per
fingerprint (shipping.py: a file in shared memory that CPU workers map rather than copy, or CUDA IPC; up to
`max_models` stay loaded), and then sends every worker its request (messages.py) and gathers the replies;
what the requests are is the engine's and the strategies' business. Every wait is bounded (deadlines.py): a
worker that dies is noticed from its process ending, one that hangs from its silent heartbeat or a call far
slower than its kind's median; the error names that worker (not a peer that failed because of it) and the
call, the pool tears itself down and starts afresh on the next job; one that died or stopped between jobs
restarts the pool before the next (`before_job`, worker_health.py). Workers leave with the host, stopped ones
too (worker_watch.py), and no file of the pool outlives it (pool_files.py).

Another machine that cannot be reached when the pool first starts fails the start, naming it, unless
`allow_missing_machines`; then, and when it cannot be reached as a pool that has run restarts, it is left out, said
in one log line, and tried again at the start of later jobs (`rejoin_missing`); when it answers, the pool restarts
with every device.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from multiprocessing import AuthenticationError
from pathlib import Path

from . import pool_files, slowdown, validation, worker_health
from .carry import CannotCarry, Carrier
from .deadlines import SILENT_S, CallClock, load_bound
from .host_modules import host_modules
from .messages import Carry, Hello, Ping, Reply, RunSetup, Shutdown, Unload
from .portable import cpu_cores
from .remote_weights import send_to_machines
from . import environment
from .launcher import forks, launcher_for
from .devices import PoolUnavailable, parse_devices, remote_machines, resolve_devices, split_device
from .pool_settings import ALLOW_MISSING_MACHINES, HANG_FACTOR, HANG_FLOOR_S, MAX_MODELS
from .worker_handle import WorkerError, WorkerHandle
from .shipping import load_requests, model_bytes, model_fingerprint, source_reads, worker_parts
from .transport import Channel, ChannelClosed, Listener, ready
from .worker_watch import heartbeat_path
from .words import counted

# The folder that holds parallel_backend/, on every worker's PYTHONPATH (a host such as ComfyUI may not have the
# package installed): one level up per dot in this module's name.
PACKAGE_PARENT = str(Path(__file__).resolve().parents[__name__.count(".")])
log = logging.getLogger("tandem")


MAX_FAILURES_KEPT = 20


@dataclass
class PoolStats:
    starts: int = 0  # the first start, then one per restart after a failure
    model_loads: int = 0
    weights_bytes_shipped: int = 0  # written for this machine's workers, plus sent to other machines
    weights_bytes_per_machine: dict = field(default_factory=dict)  # "HOST:PORT" -> bytes sent to its cache
    calls: int = 0
    rejoin_checks: int = 0  # before_job calls (the engine makes one per model call)
    rejoin_seconds: float = 0.0  # spent trying machines left out (remote.answers), every job together
    idle_restarts: int = 0  # restarts before a job, for a worker that died or stopped while the pool was idle
    model_checks: int = 0  # ensure_model calls, for a model held already too (the engine: one per model call)
    refused_connections: int = 0  # connections to the start-up listener that failed the handshake by the
    #   end of a start (a stranger's still under way then is dropped at its deadline, after)
    last_load_seconds: float = 0.0
    last_load_bytes_read: dict = field(default_factory=dict)  # rank -> bytes of the weights file its worker read
    last_load_bytes_written: int = 0  # of the files the host wrote in the pool's folder for the last load
    last_load_sources: dict = field(default_factory=dict)  # rank -> weights its worker read from their source file
    failures: list = field(default_factory=list)  # the latest MAX_FAILURES_KEPT error messages


_DETACHED = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if sys.platform == "win32"
             else {"start_new_session": True})


class WorkerPool:
    """A persistent pool of worker processes, one per device.

    devices: "auto", "cpu:2", "cuda:0,cuda:1", ... (see runtime/devices.py, parse_devices).
    timeout_s: longest wait for a call of a kind not yet timed (dead workers are noticed at once, stopped or
      frozen ones after hang_floor_s without a heartbeat, not by this timeout).
    hang_factor, hang_floor_s: a timed kind of call (model, strategy, shape) is hung after hang_factor x its
      median, at least hang_floor_s (deadlines.py); default TANDEM_HANG_FACTOR or 10, TANDEM_HANG_FLOOR_S or 20.
    max_models: models kept loaded on the workers at once (least recently used goes first; fewer when the
      memory does not allow); default TANDEM_MAX_MODELS or 2.
    pg_timeout_s: the workers' process-group timeout: no collective blocks longer on a dead peer.
    interface: the network interface gloo/NCCL bind to (None: this machine's loopback interface; a pool with
      devices of other machines needs the one that reaches them: default TANDEM_INTERFACE).
    secret_file: the shared secret of a pool with devices of other machines (docs/multi-machine.md); default
      TANDEM_SECRET_FILE.
    allow_missing_machines: a first start leaves out another machine that cannot be reached or refuses the secret,
      with a warning, instead of failing (default TANDEM_ALLOW_MISSING_MACHINES or False).
    import_paths: where workers find the host's model classes (e.g. ComfyUI's root); they come first on the
      workers' import path, ahead of this package's folder, so nothing here shadows a host module.
    test_slowdown: tests only, a stand-in for slower cards: {rank: factor} or "1:2" (worker 1 repeats its heavy
      compute twice; factors 1 to 10); default TANDEM_TEST_SLOWDOWN or none (slowdown.py).
    The settings a host may choose (secret_file, interface, allow_missing_machines, hang_factor, hang_floor_s,
    max_models) are declared in runtime/pool_settings.py; a ParallelConfig carries them
    (`ParallelConfig.pool_options()`).
    """

    def __init__(self, devices: str | tuple[str, ...] = "auto", *, timeout_s: float = 300.0,
                 start_timeout_s: float = 120.0, pg_timeout_s: float = 60.0, import_paths: tuple[str, ...] = (),
                 worker_setup: tuple[str, str, object] | None = None, interface: str | None = None,
                 hang_factor: float | None = None, hang_floor_s: float | None = None, max_models: int | None = None,
                 secret_file: str | None = None, allow_missing_machines: bool | None = None,
                 test_slowdown: dict | str | None = None):
        self.requested_devices = parse_devices(devices)
        known = None if self.requested_devices == ("auto",) else len(self.requested_devices)
        self.test_slowdown = slowdown.parse(test_slowdown, known) if test_slowdown is not None else \
            slowdown.from_environment(known)
        hang_factor, hang_floor_s, self.max_models, self.allow_missing_machines = (
            environment.setting(knob, value) for knob, value in (
                (HANG_FACTOR, hang_factor), (HANG_FLOOR_S, hang_floor_s), (MAX_MODELS, max_models),
                (ALLOW_MISSING_MACHINES, allow_missing_machines)))
        for name, value in (("timeout_s", timeout_s), ("start_timeout_s", start_timeout_s),
                            ("pg_timeout_s", pg_timeout_s)):
            validation.seconds(name, value)
        self.clock = CallClock(hang_factor, hang_floor_s, timeout_s)
        self.import_paths = tuple(import_paths)
        self.interface = interface
        # (python file, function, argument): run in every worker once it has joined, before any model arrives,
        # e.g. to give a host's library the host's settings.
        self.worker_setup = worker_setup
        self.timeout_s, self.start_timeout_s, self.pg_timeout_s = timeout_s, start_timeout_s, pg_timeout_s
        self.stats = PoolStats()
        self._lock = threading.RLock()  # one request at a time: replies are read in order on each channel
        self._workers: list[WorkerHandle] = []
        self._up = False  # set once a start has finished, cleared by the teardown
        self._dir: Path | None = None
        self._loaded: dict[str, int] = {}  # fingerprint -> weights bytes, least recently used first
        self._sources_refused: dict[str, str] = {}  # fingerprint -> why its workers could not read its file
        self._finalizer = None
        self._link = None  # a pool across machines: its remote.RemoteLink (TLS listener, store, serve daemons)
        self.secret_file = secret_file
        self.left_out: dict[str, tuple[str, ...]] = {}  # machine -> its devices, left out at the last start
        self._rejoin_tried = 0.0  # time.monotonic() of the last attempt to reach a machine left out
        self._last_job = object()  # the job of the last rejoin_missing call (nothing equals it at first)
        self.peak_memory: dict[int, int] = {}  # rank -> peak bytes, as of the last call that rank ran
        self.carrier = Carrier()  # the host objects of calls the workers hold (carry.py)
        self.weights_bytes: dict[str, dict[int, int]] = {}  # fingerprint -> rank -> bytes of weights it holds

    # ---- lifecycle -------------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """Every worker has joined and the host's set-up ran (a start half done reads False: /tandem/status
        must not list the workers a start has spawned so far)."""
        return self._up and bool(self._workers)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(w.device for w in self._workers) or self.requested_devices

    @property
    def loaded_fingerprint(self) -> str | None:
        """The fingerprint of the model the workers used last, or None when they hold none."""
        return next(reversed(self._loaded), None)

    @property
    def loaded_fingerprints(self) -> tuple[str, ...]:
        """Every model the workers hold, least recently used first."""
        return tuple(self._loaded)

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
        machines = remote_machines(devices)
        secret = self._check_remote_settings(machines)
        slowdown.parse(self.test_slowdown, len(devices))  # "auto" devices: now counted
        pool_files.sweep_stale_folders()
        pool_files.install_sigterm_cleanup()
        self._dir = pool_files.make_pool_folder()
        authkey = secrets.token_bytes(32)
        try:
            if machines:  # a pool across machines: TLS, on the configured interface, with the host's store
                from .remote import RemoteLink

                self._link = RemoteLink(devices, authkey, secret, self.secret_file, self.interface, self.pg_timeout_s)
                listener = self._link.listener
            else:
                listener = Listener(authkey)
        except BaseException:
            self._teardown()
            raise
        try:
            if machines:
                # A first start refuses a machine it cannot reach; a pool that has run leaves it out (rejoin_missing)
                leave_out = self.allow_missing_machines or self.stats.starts > 0
                devices = self._leave_out(devices, self._link.reach(leave_out))
                # The Join first: a daemon waits for it only HANDSHAKE_TIMEOUT_S after the handshake, and the local
                # spawn may first start the launcher (seconds of imports on a loaded machine).
                remote_workers = self._link.join_machines(listener.address, self.start_timeout_s)
                self._spawn(devices, listener.address, authkey, self._link.rendezvous, self._link.interface, tls=True)
                self._workers += remote_workers
            else:
                self._spawn(devices, listener.address, authkey)
            self._workers.sort(key=lambda w: w.rank)
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
        self._up = True
        # Runs if the pool is garbage-collected or the interpreter exits without shutdown() (Ctrl-C included).
        processes = [w.process for w in self._workers]
        self._finalizer = weakref.finalize(self, pool_files.kill_and_remove, processes, self._dir)
        pool_files.track(self, processes, self._dir)
        return self

    def _leave_out(self, devices: tuple[str, ...], missing: dict[str, str]) -> tuple[str, ...]:
        """`devices` without those of the machines `missing` (machine -> why it cannot be reached), said in one
        log line each; raises PoolUnavailable when no device is left."""
        self.left_out = {name: tuple(d for d in devices if split_device(d)[0] == name) for name in missing}
        kept = tuple(d for d in devices if split_device(d)[0] not in missing)
        if missing and not kept:
            raise PoolUnavailable("no device of the pool can be reached: " + "; ".join(missing.values()))
        for name, why in missing.items():
            one = len(self.left_out[name]) == 1
            log.warning("Tandem: %s; its device%s %s %s left out of the pool until it answers again (tried at the start "
                        "of later jobs); the pool runs on %s", why, "" if one else "s", ", ".join(self.left_out[name]),
                        "is" if one else "are", ", ".join(kept))
        self._rejoin_tried = time.monotonic()
        return kept

    def before_job(self, job) -> bool:
        """Called by the engine before each model call with its job, and before a VAE decode in bands (None: a job
        of one call), never within a request. On a job's first call: a worker of this machine that died or
        stopped while the pool was idle shuts the pool down (one log line; worker_health.py), and machines left
        out are tried again (rejoin_missing). True: the pool was shut down, and the job starts it afresh."""
        with self._lock:
            first_call = job is None or job != self._last_job
            fault = worker_health.idle_fault(self._workers) if first_call and self.started else None
            if fault is not None:  # a process group takes no new member: the whole pool restarts
                log.warning("Tandem: %s while the pool was idle; the pool restarts", fault)
                self.stats.idle_restarts += 1
                self._teardown()
            return self.rejoin_missing(job) or fault is not None

    def rejoin_missing(self, job) -> bool:
        """Called by before_job with the call's job (None: a job of one
        call), never within a request. On a job's first call only, when the pool runs without machines it could
        not reach, tries them again (each given remote.REJOIN_PROBE_S to answer, at most once per
        remote.rejoin_every_s()). When one answers, says so and shuts the pool down, so that the job starts it
        afresh with every device; returns True then."""
        with self._lock:
            self.stats.rejoin_checks += 1
            first_call, self._last_job = job is None or job != self._last_job, job
            if not (first_call and self.left_out and self._workers):
                return False
            from . import remote
            from .secure import read_secret

            if time.monotonic() - self._rejoin_tried < remote.rejoin_every_s():
                return False
            self._rejoin_tried = time.monotonic()
            secret = read_secret(self.secret_file)
            started = time.monotonic()
            back = [name for name in self.left_out if remote.answers(name, secret)]
            self.stats.rejoin_seconds += time.monotonic() - started
            if not back:
                return False
            log.warning("Tandem: %s %s again: the pool restarts with every device (%s)", ", ".join(back),
                        "answers" if len(back) == 1 else "answer",
                        ", ".join(resolve_devices(self.requested_devices)))
            self.shutdown()
            return True

    def _spawn(self, devices: tuple[str, ...], address, authkey: bytes, rendezvous: str | None = None,
               interface: str | None = None, tls: bool = False) -> None:
        """Starts a worker per device of this machine (the (rank, device) pairs of `devices` named locally).
        Defaults: a file rendezvous in the pool's folder, gloo/NCCL on `self.interface` or loopback."""
        rendezvous = rendezvous or f"file://{self._dir}/rendezvous"
        interface = interface or self.interface or loopback_interface()
        mine = [(rank, device) for rank, device in enumerate(devices) if split_device(device)[0] is None]
        shares = core_shares(len(mine))
        for (rank, device), cores in zip(mine, shares):
            process, log_path = spawn_worker(
                rank, len(devices), device, f"{address[0]}:{address[1]}", rendezvous, self._dir, authkey,
                pg_timeout_s=self.pg_timeout_s, watch_pid=os.getpid(), interface=interface,
                import_paths=self.import_paths, cores=cores if device == "cpu" else (), tls=tls,
                test_slowdown=self.test_slowdown.get(rank, 1.0), fork=forks(device))
            self._workers.append(WorkerHandle(rank, device, process, log_path, heartbeat_path(self._dir, rank)))

    def _check_remote_settings(self, machines: tuple[str, ...]) -> bytes | None:
        """The shared secret when `machines` (other machines' HOST:PORT) are named, after checking that the
        settings a pool across machines needs are given; None for a pool of this machine only."""
        if not machines:
            return None
        from .addresses import host_settings
        from .remote import rejoin_every_s

        self.secret_file, self.interface, secret = host_settings(machines, self.secret_file, self.interface)
        rejoin_every_s()  # TANDEM_REJOIN_S checked before anything starts
        return secret

    def _handshake(self, listener: Listener) -> None:
        """Waits for every worker's connection (the listener handshakes each in a thread of its own: a stranger's
        connection delays none) and its report of joining the group. A failed start names the strangers that came
        to the listener as such (Listener.strangers), not a worker that was kept out by them."""
        deadline = time.monotonic() + self.start_timeout_s
        waiting = {w.rank: w for w in self._workers}
        try:
            while waiting:
                failed = worker_health.start_error(waiting.values(), _also(listener))
                if failed is not None:
                    raise failed
                if time.monotonic() > deadline:
                    raise WorkerError(_not_connected(sorted(waiting), self.start_timeout_s, listener))
                try:
                    conn = listener.accept(timeout=0.5)
                except TimeoutError:
                    continue
                except (AuthenticationError, EOFError, OSError):
                    continue  # a stranger (garbage, a forged hello, a silent peer): refused, said by the listener
                channel = Channel(conn, "worker")
                hello = channel.recv(timeout=10.0)
                if not isinstance(hello, Hello) or hello.rank not in waiting:
                    channel.close()
                    continue
                worker = waiting.pop(hello.rank)
                channel.name = worker.name
                worker.channel = channel
        finally:
            self.stats.refused_connections += listener.doorway.refusals.total
        for w in self._workers:  # all connected: now each reports joining the process group (which waits for all)
            try:
                reply = w.channel.recv(timeout=max(1.0, deadline - time.monotonic()),
                                       alive=lambda: worker_health.start_error(self._workers) is None)
            except ChannelClosed:
                raise worker_health.start_error(self._workers, _also(listener)) or WorkerError(
                    f"{w.name}: failed to start: {w.death_note()}", w.device, w.rank) from None
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
        workers, self._workers, self._loaded, self._up = self._workers, [], {}, False
        self.peak_memory, self.left_out, self.weights_bytes = {}, {}, {}
        self.carrier.reset()
        deadline = time.monotonic() + grace_s
        for w in workers:
            try:
                w.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        pool_files.kill_and_remove([w.process for w in workers], self._dir)
        if self._link is not None:
            self._link.close()
            self._link = None
        pool_files.untrack(self)
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

    def request(self, requests: dict[int, object], what: str, collective: bool = False, kind=None,
                deadline: tuple[float, str] | None = None) -> dict[int, Reply]:
        """Sends each worker (by rank) its request (a message of `messages`), then gathers every Reply.

        A worker that answers with an error leaves the pool as it is (every other reply is still read) and
        raises a WorkerError naming its device and `what` it was doing. A worker that dies or hangs, or an
        interruption, tears the pool down (it restarts on the next start()), since replies may be in flight.
        collective: the workers exchange data with each other in this request, so one that fails leaves
        its peers waiting on it: the first error reply tears the pool down at once instead, and an error that
        a peer's death or hang caused is reported as that peer's.
        kind: what kind of call this is (e.g. model, strategy, shape): its deadline follows its own timings
        (`clock`); deadline: (seconds, why) for a request without a kind (default: timeout_s).
        """
        with self._lock:
            self.start()
            workers = {rank: self._workers[rank] for rank in requests}
            if deadline is None:
                deadline = self.clock.deadline(kind) if kind is not None else (self.timeout_s, "the pool's timeout")
            started = time.monotonic()
            try:
                for rank, message in requests.items():
                    self._send(workers[rank], message, what)
                replies = self._gather(workers, what, deadline, stop_on_error=collective)
            except WorkerError as exc:
                self._note_failure(str(exc))
                self._teardown()
                raise
            except BaseException:
                self._teardown()
                raise
            failed = [(rank, reply) for rank, reply in sorted(replies.items()) if not reply.ok]
            if not failed and kind is not None:
                self.clock.record(kind, time.monotonic() - started)
            self.peak_memory.update({r: reply.peak_bytes for r, reply in replies.items() if reply.peak_bytes is not None})
            if failed:
                raise self._reply_error(workers, failed[0], what, collective)
        return replies

    @staticmethod
    def _send(worker, message, what: str) -> None:
        """Sends a worker its work; a connection that closes meanwhile (the worker, or its machine, is gone) is
        a WorkerError naming the worker and its device, like any other loss."""
        try:
            worker.channel.send(message)
        except (ChannelClosed, OSError) as exc:
            try:  # a worker killed between two calls: its process ends within moments, and says how
                worker.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            why = (worker.death_note() if not worker.alive() else
                   f"its connection closed while the host sent it work ({exc}); the worker or its machine is gone")
            raise WorkerError(f"{worker.name}, {what}: {why}", worker.device, worker.rank) from None

    def _reply_error(self, workers: dict, failed: tuple, what: str, collective: bool) -> WorkerError:
        """The error for a worker's error reply, blaming a peer that died or hangs when there is one (its
        error then follows from that); tears the pool down when peers may be left waiting."""
        rank, reply = failed
        w = workers[rank]
        error = WorkerError(f"{w.name}, {what}: {reply.error}", w.device, w.rank, reply.traceback)
        culprit = worker_health.culprit(self._workers, exclude=rank, wait_s=2.0 if collective else 0.0)
        if culprit is not None:
            error = WorkerError(f"{culprit.name}, {what}: {culprit.fault_note()}; {w.name} failed as a "
                                f"consequence: {reply.error}", culprit.device, culprit.rank, reply.traceback)
        self._note_failure(str(error))
        if collective or culprit is not None:
            self._teardown()
        return error

    def _note_failure(self, message: str) -> None:
        self.stats.failures = [*self.stats.failures[-(MAX_FAILURES_KEPT - 1):], message]

    def _gather(self, workers: dict[int, WorkerHandle], what: str, deadline: tuple[float, str],
                stop_on_error: bool = False) -> dict[int, Reply]:
        """Every worker's reply (error replies included); raises WorkerError if one dies or hangs, or the
        deadline passes (the worker blamed is one that shows no sign of life if any does)."""
        replies: dict[int, dict] = {}
        pending = dict(workers)
        seconds, why = deadline
        until = time.monotonic() + seconds
        by_conn = {w.channel.conn: rank for rank, w in pending.items()}
        while pending:
            for conn in ready([w.channel.conn for w in pending.values()], timeout=0.2):
                w = pending.pop(by_conn[conn])
                try:
                    replies[w.rank] = w.channel.recv(timeout=max(seconds, 10.0))
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
            hung = [w for w in pending.values() if w.silent_for() > self.clock.floor_s]
            late = pending and time.monotonic() > until
            if hung or late:
                raise self._hang_error(hung or [w for w in pending.values() if w.silent_for() > SILENT_S],
                                       pending, what, seconds, why)
        return replies

    def _hang_error(self, silent: list, pending: dict, what: str, seconds: float, why: str) -> WorkerError:
        if silent:
            w = silent[0]
            waiting = [p.name for p in pending.values() if p not in silent]
            also = f"; {', '.join(waiting)} waited on it" if waiting else ""
            return WorkerError(f"{w.name}, {what}: {w.hang_note()}{also}; the pool restarts on the next job",
                               w.device, w.rank)
        names = ", ".join(w.name for w in pending.values())
        w = next(iter(pending.values()))
        return WorkerError(f"{names}, {what}: no answer within {seconds:.3g} s ({why}) although still running; "
                           "declared hung, the pool restarts on the next job", w.device, w.rank)

    def ensure_model(self, module, family: str, fingerprint: str | None = None, recipe=None,
                     cuts: dict | None = None, reads=None) -> str:
        """Makes every worker hold `module` (a torch.nn.Module of model family `family`); ships its weights
        only when its fingerprint is new. Up to `max_models` models stay loaded (the least recently used one
        goes first, and every other one when memory is short). A host that tracks its own weight versions
        (ComfyUI's patch uuid) passes `fingerprint`; otherwise it is computed by model_fingerprint. `recipe`:
        a function that gives the model's recipe.Recipe, called only when the model ships (the workers then
        build it from that, not from the pickled module). cuts: rank -> the cut its worker makes before the
        weights reach its device (a strategy's weights_layout; the fingerprint must name the cut); reads: cut ->
        what its worker keeps of each weight (shipping.worker_parts), so a worker of this machine reads only
        that and another machine's cache is sent only what its workers keep. Where the weights came from
        safetensors files (sources.files_of), this machine's workers read from those what matches the host's copy
        (shipping.source_reads), and the host writes only the rest; a worker that finds a weight changed refuses,
        and the host writes the model for it after all (said once per model in the log). Returns the fingerprint."""
        fingerprint = fingerprint or model_fingerprint(module, family)
        with self._lock:  # check and load as one step: another thread may release or load meanwhile
            self.stats.model_checks += 1
            self.start()
            if fingerprint in self._loaded:
                self._loaded[fingerprint] = self._loaded.pop(fingerprint)  # now the most recently used
                return fingerprint
            started = time.perf_counter()
            payload = recipe() if recipe is not None else module
            nbytes, modules = model_bytes(payload), host_modules()
            keep = self._models_to_keep(nbytes)
            remote = [w for w in self._workers if "/" in w.device]
            parts = worker_parts(payload, self._workers, cuts, reads)
            cached, sent = send_to_machines(self.request, remote, payload, family, fingerprint, self.clock.first_s,
                                            modules, parts) if remote else ({}, {})
            load = functools.partial(self._load, payload, family, fingerprint, keep=keep, nbytes=nbytes,
                                     cached=cached, modules=modules, cuts=cuts, parts=parts)
            read = {} if fingerprint in self._sources_refused else source_reads(payload, self._workers, parts)
            replies, shipped, written = load(self._workers, read)
            refused = {rank: r.value["source_refused"] for rank, r in replies.items() if "source_refused" in r.value}
            if refused:  # a weight differs from its file (a merged LoRA, say): the host writes the model after all
                rank = min(refused)
                log.warning("Tandem: the workers cannot read the model from the file it was loaded from (worker %d: "
                            "%s); the host writes it for them instead", rank, refused[rank])
                self._sources_refused[fingerprint] = refused[rank]
                while len(self._sources_refused) > 64:
                    self._sources_refused.pop(next(iter(self._sources_refused)))
                again, more, more_written = load([w for w in self._workers if w.rank in refused], {})
                replies.update(again)
                shipped, written = shipped + more, written + more_written
            held = set.intersection(*(set(r.value["held"]) for r in replies.values()))
            self._loaded = {f: size for f, size in self._loaded.items() if f in held}
            self._loaded[fingerprint] = nbytes
            self.weights_bytes = {f: sizes for f, sizes in self.weights_bytes.items() if f in held}
            self.weights_bytes[fingerprint] = {rank: r.value.get("weights_bytes", 0) for rank, r in replies.items()}
            self.stats.model_loads += 1
            self.stats.weights_bytes_shipped += shipped + sum(sent.values())
            per_machine = self.stats.weights_bytes_per_machine
            for machine, nsent in sent.items():
                per_machine[machine] = per_machine.get(machine, 0) + nsent
            self.stats.last_load_seconds = time.perf_counter() - started
            self.stats.last_load_bytes_written = written
            self.stats.last_load_sources = {rank: len(names) for rank, names in read.items() if rank not in refused}
            self.stats.last_load_bytes_read = {rank: r.value.get("bytes_read", 0) for rank, r in replies.items()}
        return fingerprint

    def _load(self, payload, family: str, fingerprint: str, workers, sources: dict, **given) -> tuple[dict, int, int]:
        """(replies, bytes of weights written, bytes of the files written) of `workers` loading the model: the
        Loads of shipping.load_requests (`given`: its settings), the files written for them removed after."""
        requests, files, shipped = load_requests(payload, family, fingerprint, workers, self._dir, sources=sources,
                                                 **given)
        written = sum(path.stat().st_size for path in files)
        try:
            replies = self.request(requests, "loading the model",
                                   deadline=load_bound(given["nbytes"], self.clock.first_s))
        except WorkerError:
            if self._workers:  # a worker refused the model (its recipe did not build, say); the pool is up
                self.release_models()  # but what each still holds is unknown: none hold anything now
            raise
        finally:
            for path in files:
                path.unlink(missing_ok=True)  # workers keep their mappings; the files need not outlive the load
        return replies, shipped, written

    def carry(self, call):
        """`call` (a calls.ModelCall) with every host object in its inputs replaced by a reference the workers
        resolve (carry.py); objects the workers lack are sent to them first, in a request of their own. Raises
        CannotCarry (one sentence; the pool stays as it is) for an object that does not pickle or that a worker
        cannot load."""
        if not call.extras:
            return call
        with self._lock:
            self.start()  # first: a restart forgets what the workers held
            extras, new = self.carrier.prepare(call.extras)
            if new:
                try:
                    self.request({w.rank: Carry(new, host_modules()) for w in self._workers}, "loading a model patch")
                except WorkerError as exc:
                    if not self._workers:  # a worker died or hung: a fault of the pool, not of the patch
                        raise
                    reason = f"a model patch cannot be loaded on the workers ({exc})"
                    self.carrier.refuse(new, reason)
                    raise CannotCarry(reason) from None
                self.carrier.sent(new)
        return replace(call, extras=extras)

    def _models_to_keep(self, nbytes: int) -> tuple[str, ...]:
        """The most recently used models that stay beside a new one of `nbytes`: up to max_models - 1 of them,
        none when this machine's free memory would not hold the new one twice over (GPU workers also check
        their own memory)."""
        import psutil

        kept = list(self._loaded)[max(0, len(self._loaded) - (self.max_models - 1)):] if self.max_models > 1 else []
        if kept and psutil.virtual_memory().available < 2 * nbytes:
            log.info("Tandem: not enough free memory to keep %s loaded beside a new one of %.0f MiB",
                     counted(len(kept), "other model"), nbytes / 2**20)
            return ()
        return tuple(kept)

    def note_weights_bytes(self, fingerprint: str, held: dict[int, int]) -> None:
        """What workers hold of a loaded model now, where a strategy cut it in place (rank -> bytes)."""
        with self._lock:
            if fingerprint in self.weights_bytes:
                self.weights_bytes[fingerprint].update(held)

    def release_models(self, fingerprint: str | None = None) -> None:
        """Drops the model with this fingerprint from the workers (None: every model), e.g. when the host frees
        memory or deletes its own copy."""
        with self._lock:
            if fingerprint is not None and fingerprint not in self._loaded:
                return
            if self._workers:
                self.request({w.rank: Unload(fingerprint) for w in self._workers}, "releasing models")
            self._loaded = {} if fingerprint is None else {f: n for f, n in self._loaded.items() if f != fingerprint}
            self.weights_bytes = {f: sizes for f, sizes in self.weights_bytes.items() if f in self._loaded}

    def memory(self) -> list[int]:
        """Peak memory per worker, in bytes (CUDA: max allocated; CPU: max resident set)."""
        replies = self.request({w.rank: Ping() for w in self._workers}, "reporting memory")
        return [replies[r].peak_bytes for r in sorted(replies)]


def _also(listener: Listener) -> str:
    """"; also ..." naming the strangers that came to the start-up listener, or ""."""
    strangers = listener.strangers()
    return f"; connections that are no worker of this pool also came to its start-up listener: {strangers}" \
        if strangers else ""


def _not_connected(ranks: list[int], seconds: float, listener: Listener) -> str:
    """Why workers `ranks` are not there after `seconds`: strangers that kept the listener full come first."""
    if listener.doorway.turned_away.total and listener.doorway.pending:
        return (f"the pool's start-up listener was kept full by connections that are no worker of this pool: "
                f"{listener.strangers()}; workers {ranks} could not connect within {seconds:g} s")
    return f"workers {ranks} did not connect within {seconds:g} s{_also(listener)}"


def core_shares(n: int) -> list[tuple[int, ...]]:
    """This machine's cores split among `n` CPU workers (each gets all of them where there are fewer than n)."""
    cores = cpu_cores()
    per_worker = max(1, len(cores) // max(n, 1))
    return [tuple(cores[i * per_worker:(i + 1) * per_worker]) if len(cores) >= n else tuple(cores) for i in range(n)]


def spawn_worker(rank: int, world: int, device: str, connect: str, rendezvous: str, folder: Path, authkey: bytes, *,
                 pg_timeout_s: float, watch_pid: int, interface: str | None, import_paths: tuple[str, ...] = (),
                 cores: tuple[int, ...] = (), tls: bool = False, test_slowdown: float = 1.0,
                 weights_cache: tuple[str, int] | None = None, fork: bool = False) -> tuple[subprocess.Popen, Path]:
    """Starts one worker process (`python -m parallel_backend.engine.worker`) that connects to `connect` (HOST:PORT),
    joins the group at `rendezvous`, and ends when process `watch_pid` does; returns it and its log file.
    cores: a CPU worker's cores (its threads and pinning); interface: where gloo/NCCL bind; test_slowdown: tests
    only, the factor its heavy compute is repeated by (slowdown.py); weights_cache: (folder, bound in bytes) of
    the serving machine's weights cache (weights_cache.py), for a worker of another machine; fork: from this
    process's launcher (launcher.py `forks`: CPU workers on Linux, until a GPU has run a forked CUDA worker)."""
    # The host's paths first: the pack's own folders (e.g. a ComfyUI pack's nodes/) never shadow them.
    env = dict(os.environ, TANDEM_AUTHKEY=authkey.hex(),
               PYTHONPATH=os.pathsep.join(filter(None, [*import_paths, os.environ.get("PYTHONPATH"), PACKAGE_PARENT])))
    if interface:
        env.update(GLOO_SOCKET_IFNAME=interface, NCCL_SOCKET_IFNAME=interface)
    command = [sys.executable, "-m", "parallel_backend.engine.worker", "--connect", connect, "--rank", str(rank),
               "--world", str(world), "--device", device, "--rendezvous", rendezvous, "--pg-timeout", str(pg_timeout_s),
               "--host-pid", str(watch_pid), "--pool-dir", str(folder)] + (["--tls"] if tls else [])
    if test_slowdown != 1.0:
        command += ["--test-slowdown", str(test_slowdown)]
    if weights_cache is not None:
        command += ["--weights-cache", str(weights_cache[0]), "--weights-cache-bytes", str(weights_cache[1])]
    if cores:
        env["OMP_NUM_THREADS"] = str(len(cores))
        command += ["--threads", str(len(cores)), "--cpus", ",".join(map(str, cores))]
    log_path = Path(folder) / f"worker-{rank}.log"
    if fork:  # forked from a launcher that has imported torch (launcher.py): ~0.1 s, not seconds
        return launcher_for(env["PYTHONPATH"]).spawn(command[3:], env, str(folder), str(log_path)), log_path
    with open(log_path, "wb") as log_file:
        # Its own session / process group: the terminal's Ctrl-C goes to the host, which shuts the workers down
        # in order. Started in the pool's own folder: `python -m` puts the working directory first on the import
        # path, and the host's (e.g. this pack's root, with its nodes/) must not shadow host modules.
        process = subprocess.Popen(command, env=env, cwd=folder, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=log_file, **_DETACHED)
    return process, log_path


def loopback_interface() -> str | None:
    """The name of this machine's loopback network interface ("lo" on Linux, "lo0" on macOS), or None where
    interfaces have no such name (Windows: gloo then picks the interface of the host name)."""
    import socket

    try:
        names = [name for _, name in socket.if_nameindex()]
    except (AttributeError, OSError):
        return None
    return next((name for name in ("lo", "lo0") if name in names), None)
