"""The encrypted, mutually authenticated control channel between machines (docs/multi-machine.md).

TLS (the standard library's `ssl`) encrypts; a shared secret authenticates. Certificates are self-signed and
not checked against any authority; instead each side proves knowledge of the secret with an HMAC that also
covers the SHA-256 fingerprint of the server's certificate *as that side sees it*. A man in the middle must
show the client a certificate of its own, so the fingerprints differ and neither proof passes on the far side;
a replayed proof fails because both sides' challenges are fresh random bytes. Only fixed-length raw bytes are
read before both proofs pass: nothing is unpickled from an unauthenticated peer.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import select
import socket
import ssl
import struct
import time
from pathlib import Path

from .doorway import Deadline

MIN_SECRET_BYTES = 16
NONCE_BYTES = 32
PROOF_BYTES = 32
_HEADER = struct.Struct("!Q")
MAX_FRAME_BYTES = 1 << 40
MIN_HANDSHAKE_S = 0.05  # the least a `whole` handshake is given once connected


class HandshakeError(ConnectionError):
    """A peer failed the TLS handshake or the secret's proof (or said nothing in time)."""


def read_secret(path: str | os.PathLike) -> bytes:
    """The shared secret in the file at `path` (surrounding whitespace dropped): at least MIN_SECRET_BYTES."""
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"the secret file {str(path)!r} cannot be read ({exc.strerror or exc}); create it with "
                         "e.g. `openssl rand -hex 32 > FILE` and copy it to every machine of the pool") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the secret in {str(path)!r} is {len(secret)} bytes long, too short to authenticate "
                         f"with: use at least {MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32 > FILE`)")
    return secret


def certificate_for(secret_path: str | os.PathLike) -> tuple[Path, Path]:
    """(certificate, private key) PEM files kept next to the secret file, made on first use (self-signed, EC
    P-256; the key readable by its owner only). Pre-shared ones in those places are used as they are."""
    base = Path(secret_path)
    cert, key = base.with_name(base.name + ".tls-cert.pem"), base.with_name(base.name + ".tls-key.pem")
    if not (cert.exists() and key.exists()):
        make_certificate(cert, key)
    return cert, key


def make_certificate(cert: Path, key: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tandem pool")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=3650)).sign(private, hashes.SHA256()))
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS 1.3 server context presenting this certificate (whose DER it keeps: the proofs cover it)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    context.tandem_cert_der = ssl.PEM_cert_to_DER_cert(Path(cert).read_text())
    return context


def _client_context() -> ssl.SSLContext:
    # No authority vouches for the peer's certificate: the secret's proof, bound to its fingerprint, does.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _proof(secret: bytes, role: bytes, nonce: bytes, fingerprint: bytes) -> bytes:
    return hmac.new(secret, b"tandem-v1|" + role + b"|" + nonce + fingerprint, hashlib.sha256).digest()


class TlsConnection:
    """Length-prefixed byte frames over a TLS socket, with the methods of multiprocessing's Connection that
    transport.Channel uses (send_bytes, recv_bytes, recv_bytes_into, poll, fileno, close)."""

    def __init__(self, sock: ssl.SSLSocket):
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def pending(self) -> bool:
        """Decrypted bytes wait in TLS's buffer (a select() on the socket does not see them)."""
        return self.sock.pending() > 0

    def send_bytes(self, data) -> None:
        view = memoryview(data).cast("B")
        self.sock.sendall(_HEADER.pack(len(view)))
        self.sock.sendall(view)

    def _read_exact(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise EOFError("the peer closed the connection")
            got += n

    def _size(self, limit: int = MAX_FRAME_BYTES) -> int:
        header = bytearray(_HEADER.size)
        self._read_exact(memoryview(header))
        (size,) = _HEADER.unpack(header)
        if size > limit:
            raise OSError(f"a frame of {size} bytes is larger than the {limit} expected")
        return size

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        buffer = bytearray(self._size(maxlength or MAX_FRAME_BYTES))
        self._read_exact(memoryview(buffer))
        return bytes(buffer)

    def recv_bytes_into(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        size = self._size(len(view))
        self._read_exact(view[:size])
        return size

    def poll(self, timeout: float = 0.0) -> bool:
        if self.pending():
            return True
        readable, _, _ = select.select([self.sock], [], [], timeout)
        return bool(readable)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _exchange(conn: TlsConnection, secret: bytes, fingerprint: bytes, server: bool) -> None:
    """Both proofs of the secret, bound to the server certificate's fingerprint; raises HandshakeError. The
    client proves first: the server answers nothing keyed to the secret to a peer that has not."""
    mine = secrets.token_bytes(NONCE_BYTES)
    try:
        if server:
            conn.send_bytes(mine)
            theirs = _read_frame(conn, NONCE_BYTES)
            _check(_read_frame(conn, PROOF_BYTES), _proof(secret, b"client", mine, fingerprint), "client")
            conn.send_bytes(_proof(secret, b"server", theirs, fingerprint))
        else:
            theirs = _read_frame(conn, NONCE_BYTES)
            conn.send_bytes(mine)
            conn.send_bytes(_proof(secret, b"client", theirs, fingerprint))
            try:
                answer = _read_frame(conn, PROOF_BYTES)
            except EOFError:  # the server closes on a proof it refuses
                raise HandshakeError("the server refused this machine's proof of the secret (do both sides read "
                                     "the same secret file?)") from None
            _check(answer, _proof(secret, b"server", mine, fingerprint), "server")
    except HandshakeError:
        raise
    except (OSError, EOFError) as exc:
        raise HandshakeError(f"the handshake broke off ({type(exc).__name__}: {exc})") from None


def _check(proof: bytes, expected: bytes, who: str) -> None:
    if not hmac.compare_digest(proof, expected):
        raise HandshakeError(f"the {who} did not prove knowledge of the pool's secret (a wrong secret, a replayed "
                             "handshake or a man in the middle)")


def _read_frame(conn: TlsConnection, size: int) -> bytes:
    got = conn._size(size)
    if got != size:
        raise OSError(f"expected {size} bytes, got a frame of {got}")
    buffer = bytearray(size)
    conn._read_exact(memoryview(buffer))
    return bytes(buffer)


def accept_tls(raw: socket.socket, secret: bytes, context: ssl.SSLContext, timeout_s: float) -> TlsConnection:
    """Server side of one connection: TLS, then both proofs, the whole within `timeout_s` (doorway.Deadline: a silent
    or trickling peer is dropped then, however it spaces its bytes); raises HandshakeError (the socket is closed)."""
    raw.settimeout(timeout_s)  # each read too: a backstop
    sock = None  # once wrapped, the TLS socket owns the descriptor: closing `raw` would leave the peer waiting
    limit = Deadline(raw.fileno(), timeout_s)
    try:
        with limit:
            sock = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            sock.do_handshake()  # not in wrap_socket: a failure there closes the descriptor before the deadline ends
            fingerprint = hashlib.sha256(context.tandem_cert_der).digest()
            conn = TlsConnection(sock)
            _exchange(conn, secret, fingerprint, server=True)
        if limit.cut:  # the deadline came as the last byte did
            raise HandshakeError("late")
    except (OSError, HandshakeError) as exc:
        (raw if sock is None else sock).close()  # the refused peer hears it now, not at its own timeout
        if limit.cut:
            raise HandshakeError(f"no complete handshake within {timeout_s:g} s (TLS and the secret's proofs)") from None
        raise exc if isinstance(exc, HandshakeError) else HandshakeError(f"TLS failed ({exc})") from None
    sock.settimeout(None)
    return conn


def connect_tls(address: tuple[str, int], secret: bytes, timeout_s: float,
                connect_timeout_s: float | None = None, whole: bool = False) -> TlsConnection:
    """Client side: connect (within `connect_timeout_s`, default `timeout_s`), then TLS and both proofs, those
    within `timeout_s`, or with `whole` within what the connect left of `timeout_s` (a probe that must keep to its
    time: a frozen machine's kernel takes the connection, and nothing answers it); raises HandshakeError or
    OSError."""
    started = time.monotonic()
    raw = socket.create_connection(tuple(address), timeout=connect_timeout_s or timeout_s)
    if whole:
        timeout_s = max(timeout_s - (time.monotonic() - started), MIN_HANDSHAKE_S)
    raw.settimeout(timeout_s)
    sock = None
    limit = Deadline(raw.fileno(), timeout_s)
    try:
        with limit:
            sock = _client_context().wrap_socket(raw, do_handshake_on_connect=False)
            sock.do_handshake()
            fingerprint = hashlib.sha256(sock.getpeercert(binary_form=True)).digest()
            conn = TlsConnection(sock)
            _exchange(conn, secret, fingerprint, server=False)
        if limit.cut:
            raise HandshakeError("late")
    except BaseException as exc:
        (raw if sock is None else sock).close()
        if limit.cut and isinstance(exc, (OSError, HandshakeError)):
            raise HandshakeError(f"the server did not complete the handshake within {timeout_s:g} s") from None
        raise
    sock.settimeout(None)
    return conn
