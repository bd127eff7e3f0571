"""Host <-> worker control channel: authenticated sockets, and tensors sent as raw out-of-band buffers.

Every connection proves knowledge of the pool's secret key (an HMAC challenge, both ways) before a single
byte is unpickled; the listener binds to loopback unless told otherwise. Tensors travel as their raw bytes
(pickle protocol 5 out-of-band buffers received straight into writable memory), not through torch.save.
"""

from __future__ import annotations

import pickle
import queue
import socket
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, answer_challenge, deliver_challenge, wait
from typing import Any, Callable

import torch

from .doorway import BACKLOG, HANDSHAKE_TIMEOUT_S, RETRY_PAUSE_S, RETRY_TURNED_AWAY_S, Deadline, Doorway


class ChannelClosed(ConnectionError):
    """The peer's end is gone (its process ended or closed the connection)."""


def _rebuild_tensor(dtype_name: str, shape: tuple[int, ...], buffer) -> torch.Tensor:
    dtype = getattr(torch, dtype_name)
    if len(memoryview(buffer)) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)


class _TensorPickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            flat = obj.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel() and flat.stride(0) != 1:  # one row of a broadcast (stride 0) passes as contiguous
                flat = flat.clone(memory_format=torch.contiguous_format)
            raw = flat.view(torch.uint8).numpy() if flat.numel() else b""
            return _rebuild_tensor, (str(obj.dtype).removeprefix("torch."), tuple(obj.shape), pickle.PickleBuffer(raw))
        return NotImplemented


def encode(obj: Any) -> list:
    """obj -> [header bytes, raw tensor buffers...]."""
    import io

    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    _TensorPickler(stream, protocol=5, buffer_callback=buffers.append).dump(obj)
    return [stream.getvalue(), *buffers]


class Channel:
    """A message channel over an authenticated Connection, with receive timeouts and liveness checks."""

    def __init__(self, conn: Connection, name: str):
        self.conn, self.name = conn, name
        _configure_socket(conn, no_delay=True)  # small frames must not wait for delayed ACKs (Nagle)

    def send(self, obj: Any) -> None:
        header, *buffers = encode(obj)
        try:
            sizes = [len(memoryview(b).cast("B")) for b in buffers]
            self.conn.send_bytes(pickle.dumps((sizes, header), protocol=5))
            for buffer in buffers:
                self.conn.send_bytes(memoryview(buffer).cast("B"))
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise ChannelClosed(f"{self.name}: connection lost while sending ({exc})") from None

    def poll(self, timeout: float) -> bool:
        try:
            return self.conn.poll(timeout)
        except (OSError, EOFError):
            return True  # recv() will report the closed end

    def recv(self, timeout: float | None = None, alive: Callable[[], bool] | None = None,
             poll_s: float = 0.2) -> Any:
        """Waits for one message. Raises TimeoutError after `timeout` s, ChannelClosed when the peer is gone
        (its socket closed, or `alive()` turned False while waiting)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))):
            if alive is not None and not alive():
                raise ChannelClosed(f"{self.name}: process ended")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name}: no answer within {timeout:g} s")
        try:
            sizes, header = pickle.loads(self.conn.recv_bytes())
            buffers = []
            for size in sizes:
                buffer = bytearray(size)
                if size:
                    self.conn.recv_bytes_into(buffer)
                else:
                    self.conn.recv_bytes()
                buffers.append(buffer)
        except (EOFError, OSError) as exc:
            raise ChannelClosed(f"{self.name}: connection closed ({type(exc).__name__})") from None
        return pickle.loads(header, buffers=buffers)

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass


def _configure_socket(conn: Connection, no_delay: bool = False) -> None:
    """Sets TCP_NODELAY on a Connection's socket without taking it over (the socket stays blocking, as Connection
    needs)."""
    sock = socket.socket(fileno=conn.fileno())  # a second object on the same socket; detach() below leaves it open
    try:
        sock.setblocking(True)  # socket() made it non-blocking if a default timeout is set (socket.setdefaulttimeout)
        if no_delay and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    finally:
        sock.detach()


class Listener:
    """Accepts authenticated connections on `host` (loopback by default); refuses peers without the key.
    tls: an ssl server context (secure.server_context): connections are then encrypted too, and the proofs of
    the key cover its certificate (secure.py), as a pool spanning machines needs.

    Connections come in through a doorway.Doorway from the moment it is made: each handshake in a thread of its own
    and within HANDSHAKE_TIMEOUT_S as a whole, at most doorway.MAX_HANDSHAKES at once, so a stranger's silent or
    trickling connection delays no worker. `accept` takes them one by one; given `arrived(conn, peer)`, each is
    handed to it instead (in its handshake's thread). `what` names the listener in the log."""

    def __init__(self, authkey: bytes, host: str = "127.0.0.1", port: int = 0, tls=None,
                 what: str = "the pool's start-up listener", arrived=None):
        self.authkey, self.tls = authkey, tls
        self.sock = socket.create_server((host, port), backlog=BACKLOG)
        self.address = self.sock.getsockname()[:2]
        self._arrivals: queue.Queue = queue.Queue()  # connections, and the errors of refused ones, for accept()
        self._lock = threading.Lock()
        self._closed = False
        self.doorway = Doorway(self.sock, f"{what} {self.address[0]}:{self.address[1]}", self._handshake,
                               arrived or self._queue, refused=None if arrived else self._queue).start()

    def _handshake(self, raw: socket.socket):
        if self.tls is not None:
            from .secure import accept_tls

            return accept_tls(raw, self.authkey, self.tls, HANDSHAKE_TIMEOUT_S)
        raw.setblocking(True)  # Connection reads the raw fd: it must stay blocking
        conn = Connection(raw.detach())
        limit = Deadline(conn.fileno(), HANDSHAKE_TIMEOUT_S)
        try:
            with limit:
                deliver_challenge(conn, self.authkey)
                answer_challenge(conn, self.authkey)
            if limit.cut:
                raise EOFError("late")
        except BaseException:
            conn.close()
            if limit.cut:
                raise ConnectionAbortedError(f"no complete handshake within {HANDSHAKE_TIMEOUT_S:g} s") from None
            raise
        return conn

    def _queue(self, item, peer=None) -> None:
        with self._lock:
            if not self._closed:
                self._arrivals.put(item)
                return
        if not isinstance(item, BaseException):  # arrived after close(): nobody will take it
            item.close()

    def accept(self, timeout: float):
        """The next authenticated connection within `timeout` s. Raises TimeoutError, or the error of a peer that
        failed the handshake (AuthenticationError for a wrong key, ...; nothing it sent is unpickled), one per call."""
        try:
            item = self._arrivals.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no worker connected within {timeout:g} s") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def strangers(self) -> str:
        """The connections that did not complete the handshake, and those turned away (doorway.Doorway.strangers)."""
        return self.doorway.strangers()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            left = []
            while not self._arrivals.empty():
                left.append(self._arrivals.get_nowait())
        self.doorway.close()
        for item in left:
            if not isinstance(item, BaseException):
                item.close()


def connect(address: tuple[str, int], authkey: bytes, name: str, tls: bool = False) -> Channel:
    """Worker side: connect and authenticate (both ways) to the host's listener; tls: to one that encrypts. A
    connection closed before the handshake began (the listener was full of strangers' handshakes, or not yet up) is
    tried again every RETRY_PAUSE_S for RETRY_TURNED_AWAY_S; a refused key is not."""
    refusal: tuple = (AuthenticationError,)
    if tls:
        from .secure import HandshakeError, connect_tls

        refusal += (HandshakeError,)
    until = time.monotonic() + RETRY_TURNED_AWAY_S
    while True:
        try:
            conn = connect_tls(tuple(address), authkey, HANDSHAKE_TIMEOUT_S) if tls else \
                Client(tuple(address), authkey=authkey)
            return Channel(conn, name)
        except refusal:
            raise
        except (EOFError, OSError):
            if time.monotonic() + RETRY_PAUSE_S >= until:
                raise
            time.sleep(RETRY_PAUSE_S)


def ready(conns: list, timeout: float) -> list:
    """The connections with something to read within `timeout` s (TLS ones with decrypted bytes waiting first:
    a select() on their sockets does not see those)."""
    waiting = [c for c in conns if getattr(c, "pending", lambda: False)()]
    return waiting or wait(conns, timeout=timeout)
