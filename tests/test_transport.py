"""The control channel: tensors survive the trip bit for bit; peers without the key are refused."""

from __future__ import annotations

import socket
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection

import pytest
import torch

from parallel_backend.runtime.transport import Channel, Listener, _configure_socket, connect


@pytest.fixture
def channel_pair():
    key = b"k" * 32
    listener = Listener(key)
    accepted = {}
    thread = threading.Thread(target=lambda: accepted.setdefault("conn", listener.accept(timeout=10)))
    thread.start()
    client = connect(listener.address, key, "client")
    thread.join()
    listener.close()
    server = Channel(accepted["conn"], "server")
    yield client, server
    client.close(), server.close()


def test_tensors_of_every_kind_round_trip(channel_pair):
    client, server = channel_pair
    message = {"x": torch.randn(2, 4, 8, 8), "bf16": torch.randn(3, 5).to(torch.bfloat16), "t": torch.tensor(981),
               "empty": torch.zeros(0, 7), "strided": torch.arange(12.0).reshape(3, 4).t(),
               "nested": [{"ids": torch.arange(5)}, None, "text"], "half": torch.randn(4).half(),
               "broadcast_row": torch.tensor(0.5).expand(4)[:1],  # a per-row timestep's share: stride 0
               "expanded_row": torch.full([1], 3.5).expand(2)[1:]}  # one row of an expanded tensor: stride 0
    client.send(message)
    got = server.recv(timeout=10)
    for key in ("x", "bf16", "t", "empty", "strided", "half", "broadcast_row", "expanded_row"):
        assert got[key].dtype == message[key].dtype and torch.equal(got[key], message[key]), key
    assert torch.equal(got["nested"][0]["ids"], torch.arange(5)) and got["nested"][1:] == [None, "text"]
    got["x"].add_(1)  # received tensors are ordinary writable tensors


def test_recv_times_out_and_notices_a_closed_peer(channel_pair):
    from parallel_backend.runtime.transport import ChannelClosed

    client, server = channel_pair
    with pytest.raises(TimeoutError):
        server.recv(timeout=0.3)
    client.close()
    with pytest.raises(ChannelClosed):
        server.recv(timeout=5)


def test_a_peer_without_the_key_is_refused_before_anything_is_unpickled():
    listener = Listener(b"right key" * 4)
    assert listener.address[0] == "127.0.0.1"
    errors = []

    def intruder():
        try:
            Client(tuple(listener.address), authkey=b"wrong key" * 4)
        except Exception as exc:  # the host refuses it
            errors.append(exc)

    thread = threading.Thread(target=intruder)
    thread.start()
    with pytest.raises(AuthenticationError):
        listener.accept(timeout=10)
    thread.join()
    assert errors


def test_a_silent_peer_cannot_stall_the_listener(monkeypatch):
    import parallel_backend.runtime.transport as transport

    monkeypatch.setattr(transport, "HANDSHAKE_TIMEOUT_S", 0.5)
    listener = Listener(b"k" * 32)
    silent = socket.create_connection(tuple(listener.address))  # connects, never answers the challenge
    outcome = []

    def accept():
        try:
            outcome.append(listener.accept(timeout=5))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=accept, daemon=True)  # a stalled accept must fail this test, not hang it
    thread.start()
    thread.join(timeout=5)
    silent.close(), listener.close()
    assert not thread.is_alive(), "the handshake still waits on a silent peer"
    assert isinstance(outcome[0], (OSError, EOFError, AuthenticationError)), outcome


@pytest.fixture
def tcp_connections():
    """Two ends of a loopback TCP socket, each a multiprocessing Connection (as Listener and Client make)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        near = socket.create_connection(server.getsockname()[:2])
        far, _ = server.accept()
    ends = Connection(near.detach()), Connection(far.detach())
    yield ends
    for end in ends:
        end.close()


def test_configuring_the_socket_leaves_the_connection_open_and_usable(tcp_connections):
    near, far = tcp_connections
    for _ in range(3):  # configuring it again and again must not close or leak it either
        _configure_socket(near, no_delay=True)
    near.send_bytes(b"to far")
    far.send_bytes(b"to near")
    assert far.recv_bytes() == b"to far" and near.recv_bytes() == b"to near"
    probe = socket.socket(fileno=near.fileno())
    try:
        assert probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        probe.detach()


def test_the_connection_stays_blocking_under_a_default_socket_timeout(tcp_connections):
    near, far = tcp_connections
    socket.setdefaulttimeout(3.0)  # some libraries set one process-wide; a wrapped socket would turn non-blocking
    try:
        _configure_socket(near, no_delay=True)
    finally:
        socket.setdefaulttimeout(None)
    late = threading.Thread(target=lambda: (time.sleep(0.3), far.send_bytes(b"late")))
    late.start()
    try:
        got = near.recv_bytes()  # a non-blocking socket raises BlockingIOError here instead of waiting
    finally:
        late.join()
    assert got == b"late"
