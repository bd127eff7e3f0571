"""The host's side of a pool across machines (docs/multi-machine.md).

The host listens for its workers on the configured interface only, over TLS with the pool's key
(secure.py), keeps the workers' rendezvous store itself (store_relay.py), and asks each other machine's
`tandem worker serve` (serve.py) for workers, over a TLS connection authenticated with the shared secret.
That connection then carries the daemon's status of its workers (exit codes, heartbeats) every
STATUS_PERIOD_S and the host's keep-alives; a daemon silent for LINK_TIMEOUT_S, or whose connection closes,
makes its workers dead to the pool, with the machine named.

A machine that cannot be reached (or refuses the secret) when the pool starts for the first time fails the start,
naming it (`RemoteLink.reach`; a command checks it before it loads a model: `check_answers`), unless the pool allows
missing machines (`allow_missing_machines`). Then, and when a pool that has run restarts without it, the machine is
left out: the pool runs on the devices that are there, and tries the machine again at the start of a later job
(`answers`, WorkerPool.rejoin_missing).
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from .messages import Join, KeepAlive, KillWorkers, MachineStatus
from . import environment
from .addresses import interface_address
from .devices import PoolUnavailable, remote_machines, split_device
from .version import __version__
from .worker_handle import WorkerHandle
from .secure import HandshakeError, certificate_for, connect_tls, server_context
from .store_relay import StoreServer
from .doorway import HANDSHAKE_TIMEOUT_S
from .transport import Channel, ChannelClosed, Listener

log = logging.getLogger("tandem")
STATUS_PERIOD_S = 0.5
REACH_RETRY_S = 5.0  # how long the host retries reaching a machine's daemon at a pool's start
REACH_TIMEOUT_S = 5.0  # one attempt's connect at a start: a machine that takes no connection is given up in 5 + 5 s
REJOIN_PROBE_S = 2.0  # the time to reach a machine left out, at the start of a later job
RETRY_PAUSE_S = 0.25  # between two attempts to connect to a machine
MIN_ATTEMPT_S = 0.1  # the least time one connect attempt is given
NOT_WITHOUT = ("the pool does not start without it (allow_missing_machines=True, --allow-missing-machines or "
               "TANDEM_ALLOW_MISSING_MACHINES=1 start it on the devices that answer)")


def link_timeout_s() -> float:
    """Seconds of silence after which the other end of a host-daemon connection counts as gone
    (TANDEM_LINK_TIMEOUT_S, default 6)."""
    return environment.number("TANDEM_LINK_TIMEOUT_S")


def rejoin_every_s() -> float:
    """The least seconds between two attempts to reach a machine the pool left out (TANDEM_REJOIN_S, default 30):
    a machine still gone costs a job at most REJOIN_PROBE_S of attempts, and no more often than this."""
    return environment.number("TANDEM_REJOIN_S")  # at least 0 (environment.py refuses less, naming it)


def answers(name: str, secret: bytes, timeout_s: float = REJOIN_PROBE_S) -> bool:
    """Whether machine `name` (HOST:PORT) takes a connection and its `tandem worker serve` completes the secret's
    handshake, the whole within `timeout_s` (a quick refusal, such as a link just back up that has not resolved its
    neighbour yet, is tried again within that time; a frozen machine, whose kernel takes the connection and whose
    daemon never answers, costs a job no more than that); the connection is closed at once (the daemon logs a
    host that left). A machine too busy to answer in time is tried again at a later job."""
    try:
        connect_daemon(name, secret, retry_s=timeout_s, whole=True).close()
    except (HandshakeError, OSError) as exc:
        log.debug("Tandem: %s still cannot be reached (%s: %s)", name, type(exc).__name__, exc)
        return False
    return True


def connect_daemon(name: str, secret: bytes, retry_s: float, attempt_s: float | None = None, whole: bool = False):
    """A TLS connection to machine `name`'s daemon (connect_tls). A connect that fails (refused, unreachable, timed
    out) is tried again every RETRY_PAUSE_S while under `retry_s` seconds have passed; each attempt's connect waits
    `attempt_s`, or by default what is left of `retry_s`. The handshake is given HANDSHAKE_TIMEOUT_S, or with
    `whole` what is left of `retry_s`. Raises the last OSError, or a HandshakeError at once."""
    host, port = name.rsplit(":", 1)
    until = time.monotonic() + retry_s
    while True:
        left = max(until - time.monotonic(), MIN_ATTEMPT_S)
        try:
            return connect_tls((host.strip("[]"), int(port)), secret, left if whole else HANDSHAKE_TIMEOUT_S,
                               connect_timeout_s=attempt_s or left, whole=whole)
        except HandshakeError:
            raise
        except OSError:
            if time.monotonic() + RETRY_PAUSE_S >= until:
                raise
            time.sleep(RETRY_PAUSE_S)


def reach_daemon(name: str, secret: bytes):
    """A connection to machine `name`'s daemon, TLS and the secret's proofs done, retrying for REACH_RETRY_S (a link
    just back up may need a moment: ARP, routes); raises PoolUnavailable with a sentence naming the machine."""
    try:
        return connect_daemon(name, secret, retry_s=REACH_RETRY_S, attempt_s=REACH_TIMEOUT_S)
    except HandshakeError as exc:
        raise PoolUnavailable(f"{name}: its `tandem worker serve` refused this host or was refused ({exc}); "
                              "both machines must read the same secret file") from None
    except OSError as exc:
        raise PoolUnavailable(f"{name}: cannot reach a `tandem worker serve` there ({exc}: is it running, with its "
                              "port open in the firewall?)") from None


def check_answers(machines: tuple[str, ...], secret: bytes) -> None:
    """Reaches each machine's daemon as a pool's first start does, then hangs up (the daemon logs a host that
    left): a command calls it before it loads a model, so that a machine that cannot be reached or refuses the
    secret is refused first. Raises PoolUnavailable naming the first such machine."""
    for name in machines:
        try:
            reach_daemon(name, secret).close()
        except PoolUnavailable as exc:
            raise PoolUnavailable(f"{exc}; {NOT_WITHOUT}") from None


def versions() -> dict:
    """What must match on every machine of a pool: Tandem's version, and ComfyUI's where the host runs one."""
    comfy = sys.modules.get("comfyui_version")
    return {"tandem": __version__, "comfyui": getattr(comfy, "__version__", None)}


class Machine:
    """One other machine's `tandem worker serve`, as the host follows it."""

    def __init__(self, name: str, secret: bytes):
        self.name, self.secret = name, secret
        self.status: dict = {}
        self.heard = time.monotonic()
        self.lost: str | None = None
        self.pids: dict[int, int] = {}
        self._channel: Channel | None = None
        self._outbox: queue.Queue = queue.Queue()
        self._closed = False

    def connect(self) -> None:
        """Reaches the daemon (`reach_daemon`); raises PoolUnavailable with a sentence naming the machine if it
        cannot."""
        self._channel = Channel(reach_daemon(self.name, self.secret), self.name)

    def join(self, join: Join, timeout_s: float) -> None:
        """Asks the daemon reached by `connect` for workers; raises PoolUnavailable naming the machine if it cannot."""
        try:
            self._channel.send(join)
            reply = self._channel.recv(timeout=timeout_s)
        except (ChannelClosed, TimeoutError) as exc:
            self._channel.close()
            raise PoolUnavailable(f"{self.name}: its `tandem worker serve` did not answer ({exc})") from None
        if not reply.ok:
            self._channel.close()
            raise PoolUnavailable(f"{self.name} refused to serve this pool: {reply.error}")
        self.pids = reply.value["pids"]
        self.heard = time.monotonic()
        threading.Thread(target=self._follow, daemon=True, name=f"tandem-machine-{self.name}").start()

    def _follow(self) -> None:
        """Reads the daemon's status and sends keep-alives (and kills asked for), all from this one thread: a
        TLS connection is not read and written from two threads at once."""
        next_beat = 0.0
        try:
            while not self._closed:
                if time.monotonic() >= next_beat:
                    self._channel.send(KeepAlive())
                    next_beat = time.monotonic() + STATUS_PERIOD_S
                while not self._outbox.empty():
                    self._channel.send(self._outbox.get_nowait())
                if self._channel.poll(0.1):
                    message = self._channel.recv(timeout=link_timeout_s())
                    if isinstance(message, MachineStatus):
                        self.status, self.heard = message.workers, time.monotonic()
        except (ChannelClosed, TimeoutError, OSError) as exc:
            if not self._closed:
                self.lost = f"its `tandem worker serve` closed the connection ({exc})"
                log.warning("Tandem: %s: %s", self.name, self.lost)

    def lost_reason(self) -> str | None:
        """Why this machine is gone (its daemon closed the connection or fell silent), or None."""
        if self.lost:
            return self.lost
        silent = time.monotonic() - self.heard
        if silent > link_timeout_s():
            return f"no word from its `tandem worker serve` for {silent:.0f} s (the link is down or the machine stopped)"
        return None

    def kill(self, ranks: tuple[int, ...]) -> None:
        self._outbox.put(KillWorkers(tuple(ranks)))

    def close(self) -> None:
        self._closed = True
        if self._channel is not None:
            time.sleep(min(0.2, STATUS_PERIOD_S))  # lets the follower send the kills queued last
            self._channel.close()


class RemoteProcess:
    """A worker process on another machine, with the part of subprocess.Popen's interface the pool uses."""

    LOST = 255  # poll()'s code once the machine itself is gone

    def __init__(self, machine: Machine, rank: int):
        self.machine, self.rank, self.pid = machine, rank, machine.pids.get(rank, -1)

    def poll(self) -> int | None:
        status = self.machine.status.get(self.rank)
        if status is not None and status.code is not None:
            return status.code
        return self.LOST if self.machine.lost_reason() else None

    def wait(self, timeout: float | None = None) -> int:
        until = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if until is not None and time.monotonic() >= until:
                raise subprocess.TimeoutExpired(f"worker {self.rank} on {self.machine.name}", timeout)
            time.sleep(0.05)
        return code

    def kill(self) -> None:
        self.machine.kill((self.rank,))


class RemoteWorker(WorkerHandle):
    """A pool worker on another machine: its signs of life come from that machine's daemon."""

    def silent_for(self) -> float:
        status = self.process.machine.status.get(self.rank)
        return (status.silent_s if status is not None else 0.0) + time.monotonic() - self.process.machine.heard

    def hang_note(self) -> str:
        status = self.process.machine.status.get(self.rank)
        state = ("its process is stopped (SIGSTOP or a debugger)" if status is not None and status.stopped
                 else "its process is frozen")
        return f"stopped answering: no sign of life for {self.silent_for():.0f} s, {state}"

    def death_note(self) -> str:
        machine = self.process.machine
        status = machine.status.get(self.rank)
        if status is not None and status.code is not None:
            import signal

            code = status.code
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            tail = f"; its log ends: {status.log_tail}" if status.log_tail else ""
            return f"worker process died ({how}) on machine {machine.name}{tail}"
        lost = machine.lost_reason()
        return f"lost machine {machine.name}: {lost}" if lost else "connection lost"


class RemoteLink:
    """What a pool across machines holds besides its workers: the TLS listener for them on `interface`, the
    rendezvous store, and one Machine per other machine named in `devices`."""

    def __init__(self, devices: tuple[str, ...], authkey: bytes, secret: bytes, secret_file: str, interface: str,
                 pg_timeout_s: float):
        self.devices, self.authkey, self.interface, self.pg_timeout_s = devices, authkey, interface, pg_timeout_s
        address = interface_address(interface)
        tls = server_context(*certificate_for(secret_file))
        self.listener = Listener(authkey, address, 0, tls=tls)
        try:
            self.store = StoreServer(authkey, address, tls)
        except BaseException:
            self.listener.close()
            raise
        self.rendezvous = self.store.init_method
        self.machines = {name: Machine(name, secret) for name in remote_machines(devices)}

    def reach(self, leave_out: bool) -> dict[str, str]:
        """Reaches every other machine's daemon. One that cannot be reached (refused, silent, or failing the
        handshake) raises PoolUnavailable naming it, or with `leave_out` is dropped with its devices. Returns machine
        -> why, for each one dropped."""
        missing = {}
        for name, machine in list(self.machines.items()):
            try:
                machine.connect()
            except PoolUnavailable as exc:
                if not leave_out:
                    raise PoolUnavailable(f"{exc}; {NOT_WITHOUT}") from None
                missing[name] = str(exc)
                del self.machines[name]
        self.devices = tuple(d for d in self.devices if split_device(d)[0] not in missing)
        return missing

    def join_machines(self, address: tuple[str, int], timeout_s: float) -> list[RemoteWorker]:
        """Asks every machine `reach` reached for its workers, which then connect to `address`; returns them."""
        workers = []
        for name, machine in self.machines.items():
            ranks = tuple(r for r, d in enumerate(self.devices) if split_device(d)[0] == name)
            machine.join(Join(versions(), f"{address[0]}:{address[1]}", self.authkey, self.rendezvous, ranks,
                              tuple(split_device(self.devices[r])[1] for r in ranks), len(self.devices),
                              self.pg_timeout_s), timeout_s)
            workers += [RemoteWorker(r, self.devices[r], RemoteProcess(machine, r), Path(os.devnull), Path(os.devnull))
                        for r in ranks]
        return workers

    def close(self) -> None:
        self.store.close()
        for machine in self.machines.values():
            machine.close()
