"""The control channel between machines, on loopback (no namespaces needed): TLS + the secret's proofs bound
to the server certificate, the settings checked before anything starts, and what `tandem worker serve` answers
to a second host or a host of another version."""

from __future__ import annotations

import stat
import threading
import time

import pytest
import torch

from parallel_backend.runtime import secure
from parallel_backend.runtime.messages import Join
from parallel_backend.runtime.devices import parse_devices, remote_machines
from parallel_backend.runtime.secure import HandshakeError, accept_tls, connect_tls, server_context
from parallel_backend.runtime.transport import Channel, Listener, connect

SECRET = b"s" * 32


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    return path


@pytest.fixture
def tls(secret_file):
    return server_context(*secure.certificate_for(secret_file))


def _accept_in_thread(listener, outcome: dict) -> threading.Thread:
    def accept():
        try:
            outcome["conn"] = listener.accept(timeout=20)
        except Exception as exc:  # what the server side saw
            outcome["error"] = exc

    thread = threading.Thread(target=accept)
    thread.start()
    return thread


def test_tensors_cross_an_encrypted_channel_and_a_wrong_secret_is_refused_both_ways(tls):
    listener = Listener(SECRET, tls=tls)
    outcome = {}
    thread = _accept_in_thread(listener, outcome)
    client = connect(listener.address, SECRET, "client", tls=True)
    thread.join()
    server = Channel(outcome["conn"], "server")
    sent = {"x": torch.randn(3, 4, 8, 8), "empty": torch.zeros(0, 2), "text": "é"}
    client.send(sent)
    got = server.recv(timeout=10)
    assert torch.equal(got["x"], sent["x"]) and got["empty"].shape == (0, 2) and got["text"] == "é"
    client.close(), server.close()

    outcome = {}
    thread = _accept_in_thread(listener, outcome)
    started = time.monotonic()
    with pytest.raises(HandshakeError, match="refused this machine's proof of the secret"):
        connect(listener.address, b"w" * 32, "intruder", tls=True)
    assert time.monotonic() - started < 5.0  # told at once, not at its handshake timeout (30 s)
    thread.join()
    listener.close()
    assert isinstance(outcome.get("error"), HandshakeError) and "secret" in str(outcome["error"])


def test_a_man_in_the_middle_with_its_own_certificate_cannot_relay_the_proofs(tls, tmp_path):
    """The relay terminates TLS with its own certificate and forwards every frame: the proofs then cover two
    different fingerprints, so the server refuses the client's."""
    own_cert, own_key = tmp_path / "mitm-cert.pem", tmp_path / "mitm-key.pem"
    secure.make_certificate(own_cert, own_key)
    mitm_tls = server_context(own_cert, own_key)
    server = Listener(SECRET, tls=tls)
    outcome = {}
    thread = _accept_in_thread(server, outcome)
    import socket

    relay = socket.create_server(("127.0.0.1", 0))

    def forward():
        raw, _ = relay.accept()
        raw.settimeout(10)
        inner = secure.TlsConnection(mitm_tls.wrap_socket(raw, server_side=True))
        outer = secure.TlsConnection(secure._client_context().wrap_socket(
            socket.create_connection(server.address, timeout=10)))
        try:  # server nonce ->, <- client nonce, <- client proof, server proof ->
            inner.send_bytes(outer.recv_bytes())
            outer.send_bytes(inner.recv_bytes())
            outer.send_bytes(inner.recv_bytes())
            inner.send_bytes(outer.recv_bytes())
        except (OSError, EOFError):
            pass
        inner.close(), outer.close()

    relayer = threading.Thread(target=forward, daemon=True)
    relayer.start()
    with pytest.raises((HandshakeError, OSError)):
        connect_tls(relay.getsockname(), SECRET, 10.0)
    thread.join()
    server.close(), relay.close()
    assert isinstance(outcome.get("error"), HandshakeError), outcome


def test_a_replayed_proof_is_refused(tls):
    """A proof recorded from one session, sent again in another: the server's challenge is fresh, so it fails."""
    import hashlib
    import socket

    listener = Listener(SECRET, tls=tls)
    fingerprint = hashlib.sha256(tls.tandem_cert_der).digest()
    outcome = {}
    thread = _accept_in_thread(listener, outcome)
    conn = secure.TlsConnection(secure._client_context().wrap_socket(socket.create_connection(listener.address)))
    conn.recv_bytes()  # this session's challenge, ignored
    old_challenge = b"c" * secure.NONCE_BYTES
    conn.send_bytes(b"n" * secure.NONCE_BYTES)
    conn.send_bytes(secure._proof(SECRET, b"client", old_challenge, fingerprint))
    thread.join()
    listener.close()
    conn.close()
    assert isinstance(outcome.get("error"), HandshakeError), outcome


def test_a_silent_or_garbage_peer_is_dropped_within_the_handshake_timeout(tls):
    import socket

    server_sock = socket.create_server(("127.0.0.1", 0))
    for payload in (None, b"GET / HTTP/1.0\r\n\r\n" * 10):
        client = socket.create_connection(server_sock.getsockname())
        if payload:
            client.sendall(payload)
        raw, _ = server_sock.accept()
        started = time.monotonic()
        with pytest.raises(HandshakeError):
            accept_tls(raw, SECRET, tls, timeout_s=1.0)
        assert time.monotonic() - started < 3.0
        client.close()
    server_sock.close()


def test_secret_files_are_checked_and_the_certificate_is_made_once(tmp_path, secret_file):
    with pytest.raises(ValueError, match="cannot be read"):
        secure.read_secret(tmp_path / "missing")
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ValueError, match="too short"):
        secure.read_secret(short)
    assert secure.read_secret(secret_file) == SECRET
    cert, key = secure.certificate_for(secret_file)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = cert.read_bytes()
    assert secure.certificate_for(secret_file) == (cert, key) and cert.read_bytes() == before


def test_devices_of_other_machines():
    devices = parse_devices("cpu:2,10.213.0.2:7000/cpu:2,box2:7001/cpu")
    assert devices == ("cpu", "cpu", "10.213.0.2:7000/cpu", "10.213.0.2:7000/cpu", "box2:7001/cpu")
    assert remote_machines(devices) == ("10.213.0.2:7000", "box2:7001")
    assert parse_devices("cuda:0,[fe80::1]:7000/cuda:0") == ("cuda:0", "[fe80::1]:7000/cuda:0")
    for bad, says in (("box2/cuda:0", "HOST:PORT/DEVICE"), ("box2:0/cpu", "between 1 and 65535"),
                      ("box2:7000/tpu", "HOST:PORT/DEVICE"), ("box2:7000/cuda:1,box2:7000/cuda:1", "twice"),
                      ("cpu,box2:7000/cuda:0", "mix")):
        with pytest.raises(ValueError, match=says):
            parse_devices(bad)


def test_a_pool_with_other_machines_needs_a_secret_and_an_interface(monkeypatch, tmp_path, secret_file):
    from parallel_backend.runtime.pool import WorkerPool

    monkeypatch.delenv("TANDEM_SECRET_FILE", raising=False)
    monkeypatch.delenv("TANDEM_INTERFACE", raising=False)
    with pytest.raises(ValueError, match="shared secret file"):
        WorkerPool("cpu,127.0.0.1:7000/cpu").start()
    with pytest.raises(ValueError, match="network interface"):
        WorkerPool("cpu,127.0.0.1:7000/cpu", secret_file=str(secret_file)).start()
    with pytest.raises(ValueError, match=r"network interface 'nonexistent0' \(interface=, TANDEM_INTERFACE or "
                                         r"--interface\) does not exist"):
        WorkerPool("cpu,127.0.0.1:7000/cpu", secret_file=str(secret_file), interface="nonexistent0").start()
    assert not list(tmp_path.glob("tandem-pool-*"))


@pytest.fixture
def daemon(secret_file, tmp_path):
    from parallel_backend.runtime.serve import ServeDaemon

    serve = ServeDaemon("127.0.0.1:0", "cpu:1", str(secret_file), interface="lo", cache_dir=str(tmp_path / "weights"))
    thread = threading.Thread(target=serve.serve_forever, daemon=True)
    thread.start()
    yield serve
    serve.stop()
    thread.join(timeout=10)


def _join(versions: dict) -> Join:
    return Join(versions, "127.0.0.1:1", b"k" * 32, "tandem://127.0.0.1:1", (1,), ("cpu",), 2, 10.0)


def test_serve_refuses_a_second_host_and_a_host_of_another_version(daemon):
    from parallel_backend.runtime.remote import versions

    first = Channel(connect_tls(("127.0.0.1", daemon.port), SECRET, 10.0), "first")  # holds the machine, silent
    second = Channel(connect_tls(("127.0.0.1", daemon.port), SECRET, 10.0), "second")
    reply = second.recv(timeout=10)
    assert not reply.ok and "already serve another host" in reply.error
    second.close(), first.close()
    time.sleep(0.5)
    other = Channel(connect_tls(("127.0.0.1", daemon.port), SECRET, 10.0), "other version")
    other.send(_join({**versions(), "tandem": "9.9.9"}))
    reply = other.recv(timeout=15)
    assert not reply.ok and "Tandem 9.9.9" in reply.error and "same version" in reply.error
    other.close()
    comfy = Channel(connect_tls(("127.0.0.1", daemon.port), SECRET, 10.0), "comfy host")
    comfy.send(_join({**versions(), "comfyui": "0.24.0"}))
    reply = comfy.recv(timeout=15)
    assert not reply.ok and "ComfyUI 0.24.0" in reply.error and "--comfyui" in reply.error
    comfy.close()
