"""Listeners that strangers cannot knock over (issue 28): one deadline for a whole handshake, a bound on the
handshakes under way at once, and accept() errors survived.

Every listener of Tandem (the pool's start-up listener and its rendezvous store, `tandem worker serve`) takes its
connections through a `Doorway`: an accept loop that gives each connection a thread of its own for the handshake
(a silent or slow peer delays no other), closes at once a connection that arrives while MAX_HANDSHAKES are under
way, and outlives accept()'s errors (EMFILE, ENFILE, ENOBUFS: out of descriptors or memory) with a pause of
ACCEPT_PAUSE_S. What it refuses, turns away or fails to accept is counted and said in the log a few lines per
LOG_EVERY_S, never a line per connection of a flood.

`Deadline` bounds a whole handshake (TLS and both proofs, or multiprocessing's challenge), not each read: when it
passes, the socket is shut down, which ends any read or write blocked on it, however the peer trickles its bytes.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time

log = logging.getLogger("tandem")

# The one place for these bounds; each says why its value.
HANDSHAKE_TIMEOUT_S = 10.0  # a connection's whole handshake (TLS and the secret's proofs, or multiprocessing's
#   challenge both ways). Milliseconds between machines that answer; 10 s leaves room for a loaded machine or a slow
#   link, and is the longest a silent or trickling stranger holds a descriptor and a thread.
MAX_HANDSHAKES = 64  # handshakes under way at once per listener; a connection beyond is closed at once. Each holds a
#   descriptor, a thread and TLS state (~100 KiB): 64 keep a flood far below the usual limit of 1,024 descriptors,
#   leaving room for the pool's own sockets and files, while an honest peer needs one (a pool's workers take
#   milliseconds each and retry when turned away: RETRY_TURNED_AWAY_S).
BACKLOG = 64  # connections the kernel queues before accept(): a pool's workers arriving at once, or a flood being
#   drained; they hold no descriptor of ours until accepted.
ACCEPT_PAUSE_S = 0.1  # after accept() failed for want of descriptors or memory: a freed descriptor is used soon,
#   and a listener with none left does not spin a core on the connection still waiting in the backlog.
ACCEPT_POLL_S = 0.5  # how often the accept loop looks whether its listener closed (and says what it counted).
LOG_EVERY_S = 10.0  # one summary line per kind of event (refused, turned away, accept failed) and listener per this
#   long: the handshake deadline, the pace at which a flood's connections are dropped.
SAID_ONE_BY_ONE = 10  # refusals logged one by one (address, why) per LOG_EVERY_S before the rest are only counted:
#   a few intruders are each named, a flood is not a line per connection.
STRANGERS_NAMED = 3  # connections named in a failed start's error; the rest are counted.
RETRY_TURNED_AWAY_S = 3 * HANDSHAKE_TIMEOUT_S  # how long a worker tries again a connection the host's listener
#   closed at once: a full listener frees a place within one handshake deadline, so three let a worker in unless
#   strangers keep refilling it (the start then fails naming them).
RETRY_PAUSE_S = 0.2  # between two such attempts: a few per second, not a flood of our own.

# accept() failures that concern one connection only (it went before we took it): take the next one at once.
_ONE_CONNECTION = {errno.ECONNABORTED, errno.EINTR, errno.EPROTO, errno.EPERM}


def _shut(fd: int) -> None:
    """Shuts socket `fd` down both ways without closing it: a read blocked on it returns, its owner closes it."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()


class _Cutter:
    """One thread per process that shuts down the sockets whose Deadline passed."""

    def __init__(self):
        self._changed = threading.Condition()
        self._armed: set = set()
        self._pid = None  # the process whose thread runs: a forked child starts its own

    def arm(self, deadline: "Deadline") -> None:
        with self._changed:
            if self._pid != os.getpid():
                self._armed, self._pid = set(), os.getpid()
                threading.Thread(target=self._run, daemon=True, name="tandem-handshake-deadlines").start()
            self._armed.add(deadline)
            self._changed.notify()

    def disarm(self, deadline: "Deadline") -> None:
        with self._changed:  # once this returns no shutdown can come: the caller may close the descriptor
            self._armed.discard(deadline)

    def _run(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                for deadline in [d for d in self._armed if d.due <= now]:
                    self._armed.discard(deadline)
                    deadline.cut = True
                    _shut(deadline.fd)
                due = min((d.due for d in self._armed), default=None)
                self._changed.wait(None if due is None else max(0.0, due - now))


_CUTTER = _Cutter()


class Deadline:
    """`with Deadline(fd, seconds):` shuts socket `fd` down once `seconds` have passed, unless the block ended first;
    a read or write blocked on it then fails, and the handshake with it. `cut` says whether it did. The descriptor
    must stay open until the block has ended (close it after)."""

    def __init__(self, fd: int, seconds: float):
        self.fd, self.seconds, self.cut, self.due = fd, seconds, False, 0.0

    def __enter__(self) -> "Deadline":
        self.due = time.monotonic() + self.seconds
        _CUTTER.arm(self)
        return self

    def __exit__(self, *exc) -> bool:
        _CUTTER.disarm(self)
        return False


class _Tally:
    """One kind of event at a listener: counted, the first `one_by_one` of each LOG_EVERY_S said as they come, the
    rest in one line once the period is over."""

    def __init__(self, what: str, one_by_one: int):
        self.what, self.one_by_one = what, one_by_one
        self.total = 0
        self._lock = threading.Lock()
        self._since, self._said, self._unsaid, self._last, self._summary = float("-inf"), 0, 0, "", ""

    def add(self, said: str, summary: str) -> None:
        """One event; `said`: its line; `summary`: what the period's line says of the ones not said ({n}: how many,
        {last}: the last one's line)."""
        with self._lock:
            self.total += 1
            self._close_period(time.monotonic())
            if self._said < self.one_by_one:
                self._said += 1
                log.warning("Tandem: %s %s", self.what, said)
            else:
                self._unsaid, self._last, self._summary = self._unsaid + 1, said, summary

    def flush(self) -> None:
        with self._lock:
            self._close_period(time.monotonic())

    def _close_period(self, now: float) -> None:
        if now - self._since < LOG_EVERY_S:
            return
        if self._unsaid:
            log.warning("Tandem: %s %s", self.what, self._summary.format(n=self._unsaid, last=self._last,
                                                                         s=now - self._since))
        self._since, self._said, self._unsaid = now, 0, 0


class Doorway:
    """The entrance of listening socket `sock` (`what` names it in the log). `handshake(raw)` runs in a thread of its
    own per connection and returns the authenticated connection (it bounds itself with a Deadline and closes `raw`
    when it fails); then `arrived(conn, peer)` runs in that thread, no longer counted as under way. `refused(exc,
    peer)`, if given, hears each failed handshake. `run` is the accept loop (`start`: in a thread), `close` ends it."""

    def __init__(self, sock: socket.socket, what: str, handshake, arrived, refused=None, cap: int | None = None):
        self.sock, self.what, self.handshake, self.arrived, self.refused = sock, what, handshake, arrived, refused
        self.cap = MAX_HANDSHAKES if cap is None else cap
        self.pending: dict[tuple, float] = {}  # peer -> when it connected, for each handshake under way
        self.refused_lately: list[tuple[tuple, str]] = []  # the latest STRANGERS_NAMED (peer, why)
        self.refusals = _Tally(what, SAID_ONE_BY_ONE)
        self.turned_away = _Tally(what, 1)
        self.accept_failures = _Tally(what, 1)
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def start(self) -> "Doorway":
        threading.Thread(target=self.run, daemon=True, name="tandem-accept").start()
        return self

    def run(self) -> None:
        self.sock.settimeout(ACCEPT_POLL_S)
        while not self._closed.is_set():
            for tally in (self.refusals, self.turned_away, self.accept_failures):
                tally.flush()
            try:
                raw, peer = self.sock.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                if self._closed.is_set() or self.sock.fileno() < 0:
                    return
                if exc.errno not in _ONE_CONNECTION:
                    self.accept_failures.add(f"could not accept a connection ({exc}); trying again every "
                                             f"{ACCEPT_PAUSE_S:g} s",
                                             "could not accept a connection {n} more time(s) in the last {s:.0f} s "
                                             "(the last: {last})")
                    time.sleep(ACCEPT_PAUSE_S)
                continue
            self._admit(raw, peer)

    def _admit(self, raw: socket.socket, peer) -> None:
        with self._lock:
            full = len(self.pending) >= self.cap
            if not full:
                self.pending[peer] = time.monotonic()
        if full:
            raw.close()
            self.turned_away.add(f"turned away a connection from {_address(peer)}: {self.cap} handshakes are under "
                                 "way, the most at once (more are counted, not said one by one)",
                                 "turned away {n} more connection(s) in the last {s:.0f} s: "
                                 f"{self.cap} handshakes were under way")
            return
        try:
            threading.Thread(target=self._greet, args=(raw, peer), daemon=True, name="tandem-handshake").start()
        except RuntimeError as exc:  # no thread can be started now: as for a descriptor, drop this one
            with self._lock:
                self.pending.pop(peer, None)
            raw.close()
            self.accept_failures.add(f"could not take a connection from {_address(peer)} ({exc})",
                                     "could not take {n} more connection(s) in the last {s:.0f} s ({last})")

    def _greet(self, raw: socket.socket, peer) -> None:
        try:
            conn = self.handshake(raw)
        except Exception as exc:  # noqa: BLE001 - whatever a stranger caused, it is refused and said
            why = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.pending.pop(peer, None)
                self.refused_lately = [*self.refused_lately[-(STRANGERS_NAMED - 1):], (peer, why)]
            self.refusals.add(f"refused a connection from {_address(peer)} ({why})",
                              "refused {n} more connection(s) in the last {s:.0f} s (the last: {last})")
            if self.refused is not None:
                self.refused(exc, peer)
            return
        with self._lock:
            self.pending.pop(peer, None)
        self.arrived(conn, peer)

    def strangers(self) -> str:
        """The connections that have not completed the handshake (under way now, or refused lately) and how many
        were turned away, in a sentence ("" when there are none)."""
        now = time.monotonic()
        with self._lock:
            named = [f"a connection from {_address(p)} that never completed the handshake (open for {now - t:.0f} s)"
                     for p, t in self.pending.items()]
            named += [f"a connection from {_address(p)} that failed the handshake ({why})"
                      for p, why in self.refused_lately]
        more = len(named) - STRANGERS_NAMED
        text = ", ".join(named[:STRANGERS_NAMED]) + (f" and {more} more" if more > 0 else "")
        if self.turned_away.total:
            text += (f"{'; ' if text else ''}{self.turned_away.total} connection(s) turned away while {self.cap} "
                     "handshakes were under way (the most at once)")
        return text

    def close(self) -> None:
        """Ends the accept loop and closes the listening socket; handshakes under way end by their deadline."""
        self._closed.set()
        self.sock.close()


def _address(peer) -> str:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
