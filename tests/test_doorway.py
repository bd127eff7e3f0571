"""Listeners that strangers cannot knock over (runtime/doorway.py; issue 28): one deadline for a whole handshake,
however a peer spaces its bytes; a bound on the handshakes under way, the rest closed at once and said once in a
while; accept()'s errors survived; a worker turned away by a full listener tries again and gets in."""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import struct
import threading
import time

import pytest

from parallel_backend.runtime import doorway, secure, transport
from parallel_backend.runtime.doorway import Doorway
from parallel_backend.runtime.secure import HandshakeError, accept_tls, server_context
from parallel_backend.runtime.transport import Listener, connect

DEADLINE_S = 1.5
BYTE_EVERY_S = 0.25  # far under DEADLINE_S: a bound per read would never fire
SLACK_S = 1.5  # a loaded 2-core machine


class Trickler(threading.Thread):
    """Sends `first`, then one byte every BYTE_EVERY_S through `send` until the other side closes (or 30 s)."""

    def __init__(self, send, first: bytes = b""):
        super().__init__(daemon=True)
        self.send, self.first, self.sent, self.dropped_after = send, first, 0, None

    def run(self) -> None:
        started = time.monotonic()
        try:
            if self.first:
                self.send(self.first)
            while time.monotonic() - started < 30:
                self.send(b"\x07")
                self.sent += 1
                time.sleep(BYTE_EVERY_S)
        except OSError:
            self.dropped_after = time.monotonic() - started


def test_a_trickling_peer_is_dropped_at_the_listeners_deadline_not_after_many_reads(monkeypatch):
    monkeypatch.setattr(transport, "HANDSHAKE_TIMEOUT_S", DEADLINE_S)
    listener = Listener(b"k" * 32)
    peer = socket.create_connection(tuple(listener.address))
    peer.recv(4096)  # the listener's challenge; the answer then comes a byte at a time
    trickler = Trickler(peer.sendall, first=struct.pack("!i", 200))  # an answer of 200 bytes, announced
    started = time.monotonic()
    trickler.start()
    try:
        with pytest.raises(ConnectionAbortedError, match=f"within {DEADLINE_S:g} s"):
            listener.accept(timeout=30)
        assert time.monotonic() - started < DEADLINE_S + SLACK_S
        trickler.join(timeout=10)
        assert trickler.dropped_after is not None and trickler.dropped_after < DEADLINE_S + SLACK_S
        assert trickler.sent >= 3, trickler.sent  # many reads went by, each well within any bound per read
    finally:
        peer.close(), listener.close()


@pytest.fixture
def tls_context(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 32)
    return server_context(*secure.certificate_for(secret))


@pytest.mark.parametrize("phase", ["tls", "proofs"])
def test_a_trickling_peer_is_dropped_at_the_tls_handshakes_deadline(tls_context, phase):
    """tls: a TLS record of 16 KiB announced, then a byte at a time; proofs: TLS completes, then the client's nonce
    a byte at a time, each in a TLS record of its own (every read returns one byte)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname()[:2])
        raw, _ = server.accept()
    outcome = {}
    started = time.monotonic()

    def serve():
        try:
            outcome["conn"] = accept_tls(raw, b"s" * 32, tls_context, DEADLINE_S)
        except HandshakeError as exc:
            outcome["error"], outcome["after"] = exc, time.monotonic() - started

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    if phase == "tls":
        trickler = Trickler(client.sendall, first=b"\x16\x03\x01\x40\x00")
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        client = context.wrap_socket(client)
        client.recv(8 + secure.NONCE_BYTES)  # the server's nonce frame
        trickler = Trickler(client.sendall, first=struct.pack("!Q", secure.NONCE_BYTES))
    trickler.start()
    thread.join(timeout=30)
    client.close()
    assert "error" in outcome and f"within {DEADLINE_S:g} s" in str(outcome["error"]), outcome
    assert outcome["after"] < DEADLINE_S + SLACK_S, outcome
    assert trickler.sent >= 3, trickler.sent


def test_connections_beyond_the_bound_are_closed_at_once_and_said_once(caplog):
    release, arrived = threading.Event(), []

    def handshake(raw):  # a handshake that takes as long as the test says
        release.wait(30)
        return raw

    server = socket.create_server(("127.0.0.1", 0))
    door = Doorway(server, "a test listener", handshake, lambda conn, peer: arrived.append(conn), cap=2).start()
    caplog.set_level(logging.WARNING, logger="tandem")
    clients = []
    try:
        for _ in range(2):
            clients.append(socket.create_connection(server.getsockname()[:2]))
        _wait(lambda: len(door.pending) == 2)
        extra = [socket.create_connection(server.getsockname()[:2]) for _ in range(5)]
        for sock in extra:  # closed at once: end of file (or a reset), well before any deadline
            sock.settimeout(5)
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
        _wait(lambda: door.turned_away.total == 5)
        assert len(door.pending) == 2
        said = [r.getMessage() for r in caplog.records if "turned away" in r.getMessage()]
        assert len(said) == 1 and "2 handshakes are under way" in said[0], said
        assert "5 connection(s) turned away" in door.strangers()
        release.set()
        _wait(lambda: len(arrived) == 2)
        assert not door.pending
    finally:
        release.set()
        door.close()
        for sock in clients + arrived:
            sock.close()


class FailingAccepts:
    """A listening socket whose accept() first fails `failures` times as when descriptors run out."""

    def __init__(self, sock: socket.socket, failures: int):
        self.sock, self.failures = sock, failures

    def accept(self):
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_accept_errors_are_survived_with_a_pause_and_said_once(caplog):
    caplog.set_level(logging.WARNING, logger="tandem")
    server = socket.create_server(("127.0.0.1", 0))
    arrived = threading.Event()
    door = Doorway(FailingAccepts(server, failures=8), "a test listener", lambda raw: raw,
                   lambda conn, peer: (conn.close(), arrived.set())).start()
    client = socket.create_connection(server.getsockname()[:2])
    try:
        assert arrived.wait(10), "the listener stopped taking connections after accept() failed"
        assert door.accept_failures.total == 8
        said = [r.getMessage() for r in caplog.records if "could not accept" in r.getMessage()]
        assert len(said) == 1 and "Too many open files" in said[0], said
    finally:
        client.close()
        door.close()


def test_a_worker_turned_away_by_a_full_listener_tries_again_and_gets_in(monkeypatch):
    monkeypatch.setattr(doorway, "MAX_HANDSHAKES", 1)
    monkeypatch.setattr(transport, "HANDSHAKE_TIMEOUT_S", DEADLINE_S)
    listener = Listener(b"k" * 32)
    stranger = socket.create_connection(tuple(listener.address))  # holds the one place until its deadline
    _wait(lambda: len(listener.doorway.pending) == 1)
    worker = connect(listener.address, b"k" * 32, "worker")  # turned away, then in once the stranger is dropped
    try:
        with pytest.raises(ConnectionAbortedError):  # the stranger's refusal comes first
            listener.accept(timeout=10)
        server_side = listener.accept(timeout=10)
        worker.send("hello")
        assert transport.Channel(server_side, "host").recv(timeout=10) == "hello"
        assert listener.doorway.turned_away.total >= 1
        server_side.close()
    finally:
        worker.close(), stranger.close(), listener.close()


def _wait(condition, seconds: float = 10.0) -> None:
    until = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < until, "timed out waiting"
        time.sleep(0.02)
