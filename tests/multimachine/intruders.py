"""Connections that must be refused by `tandem worker serve` (run in the host's namespace against ADDRESS:PORT):
a wrong secret, a plain TCP client sending garbage, a client that connects and says nothing, and the bytes of
a real client's handshake replayed. Prints one JSON object: per intruder, whether it was refused and how long
the daemon took to drop it.

    intruders.py ADDRESS PORT SECRET_FILE
    intruders.py --spray ADDRESS:PORT...   (garbage to each listener, and a connection left silent for 2 s)
    intruders.py --flood ADDRESS:PORT SILENT TRICKLING WATCH_S   (flood(): one line once all are open, one at the end)
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import ssl
import sys
import threading
import time

from parallel_backend.runtime.secure import HandshakeError, connect_tls, read_secret


def dropped_after(sock: socket.socket, limit_s: float = 30.0) -> float:
    """Seconds until the daemon closes this connection (reads and discards what it sends meanwhile)."""
    started = time.monotonic()
    sock.settimeout(limit_s)
    try:
        while sock.recv(65536):
            pass
    except (socket.timeout, OSError):
        pass
    return time.monotonic() - started


def wrong_secret(address) -> dict:
    started = time.monotonic()
    try:
        connect_tls(address, os.urandom(32), 15.0)
        return {"refused": False}
    except (HandshakeError, OSError) as exc:
        return {"refused": True, "seconds": time.monotonic() - started, "why": str(exc)}


def garbage(address) -> dict:
    sock = socket.create_connection(address, timeout=10)
    sock.sendall(os.urandom(4096) + b"\x80\x04\x95 not a pickle")
    return {"refused": True, "seconds": dropped_after(sock)}


def silent(address) -> dict:
    sock = socket.create_connection(address, timeout=10)
    return {"refused": True, "seconds": dropped_after(sock)}


def replayed(address, secret: bytes) -> dict:
    """A real client's bytes, recorded by a relay on loopback, sent again on a fresh connection."""
    relay = socket.create_server(("127.0.0.1", 0))
    recorded = bytearray()

    def forward():
        inner, _ = relay.accept()
        outer = socket.create_connection(address, timeout=10)
        inner.settimeout(0.5)
        outer.settimeout(0.5)
        for _ in range(40):
            for src, dst, keep in ((inner, outer, True), (outer, inner, False)):
                try:
                    data = src.recv(65536)
                except socket.timeout:
                    continue
                if keep:
                    recorded.extend(data)
                dst.sendall(data)
        inner.close(), outer.close()

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    conn = connect_tls(relay.getsockname(), secret, 15.0)  # the real client: it authenticates
    time.sleep(1.0)
    conn.close()
    thread.join(timeout=30)
    sock = socket.create_connection(address, timeout=10)
    sock.sendall(bytes(recorded))
    return {"refused": True, "seconds": dropped_after(sock), "bytes": len(recorded)}


def spray(targets: list[str]) -> dict:
    """Garbage to every listener, and a connection to each left silent a while; {target: what happened}."""
    outcome = {}
    silent_ones = []
    for target in targets:
        host, port = target.rsplit(":", 1)
        try:
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(os.urandom(2048))
            sock.close()
            silent_ones.append(socket.create_connection((host, int(port)), timeout=5))
            outcome[target] = "sent"
        except OSError as exc:
            outcome[target] = f"{type(exc).__name__}: {exc}"
    time.sleep(2.0)
    for sock in silent_ones:
        sock.close()
    return outcome


TRICKLE_EVERY_S = 4.0  # the slow peer: a byte every 4 s after the TLS handshake, each read's bound reset
AT_ONCE_S = 3.0  # a connection closed within this of opening was turned away (a loaded machine notices late), not
#   dropped at a deadline (10 s)


def _trickler(address) -> socket.socket:
    """A connection through TLS (the daemon's certificate unchecked, as any client's) whose proofs then come a byte
    at a time: it reads the daemon's nonce and announces its own."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    sock = context.wrap_socket(socket.create_connection(address, timeout=10))
    got = b""
    while len(got) < 8 + 32:  # the daemon's nonce frame (its header and 32 bytes, maybe in two records)
        chunk = sock.recv(64)
        if not chunk:
            raise ConnectionResetError("closed before its nonce")
        got += chunk
    sock.sendall((32).to_bytes(8, "big"))
    return sock


class Flood:
    """Connections to one address, watched: when each closes, and the trickling ones sent a byte now and then."""

    def __init__(self, address):
        self.address, self.selector = address, selectors.DefaultSelector()
        self.outcome = {kind: {"turned_away": 0, "dropped_s": [], "not_opened": 0, "held": 0}
                        for kind in ("silent", "trickling")}
        self.next_byte = time.monotonic() + TRICKLE_EVERY_S

    def open(self, kind: str) -> None:
        started = time.monotonic()
        try:
            sock = _trickler(self.address) if kind == "trickling" else socket.create_connection(self.address, timeout=10)
        except OSError:
            self.outcome[kind]["turned_away" if time.monotonic() - started < AT_ONCE_S else "not_opened"] += 1
            return
        if kind == "silent":
            started = time.monotonic()  # connect() may wait out a full backlog; the daemon's clock starts later
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ, (kind, started))

    def watch(self, timeout: float) -> None:
        """Notes the connections the daemon closed (waiting up to `timeout`), and trickles when it is time."""
        for key, _ in self.selector.select(timeout=timeout):
            kind, started = key.data
            try:
                if key.fileobj.recv(64):
                    continue
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                continue
            except OSError:  # a reset, or TLS's end of file: closed all the same
                pass
            lasted = time.monotonic() - started
            if lasted < AT_ONCE_S:
                self.outcome[kind]["turned_away"] += 1
            else:
                self.outcome[kind]["dropped_s"].append(round(lasted, 2))
            self.selector.unregister(key.fileobj)
            key.fileobj.close()
        if time.monotonic() >= self.next_byte:
            self.next_byte += TRICKLE_EVERY_S
            for key in list(self.selector.get_map().values()):
                if key.data[0] == "trickling":
                    try:
                        key.fileobj.send(b"\x07")
                    except OSError:
                        pass  # closed: watch() sees it

    def end(self) -> dict:
        for key in list(self.selector.get_map().values()):
            self.outcome[key.data[0]]["held"] += 1
            key.fileobj.close()
        return self.outcome


def flood(target: str, silent: int, trickling: int, watch_s: float) -> dict:
    """`trickling` connections that complete TLS and then send a byte every TRICKLE_EVERY_S, then `silent` ones that
    say nothing, opened as fast as they go; then watched until all are closed or `watch_s` passes. Prints
    {"event": "open"} once all are opened; returns per kind the connections turned away (closed within AT_ONCE_S),
    the seconds each other one lasted before the daemon dropped it, those never opened, and those still held."""
    import resource

    host, port = target.rsplit(":", 1)
    need = silent + trickling + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(need, hard)))
    watched = Flood((host, int(port)))
    for kind, count in (("trickling", trickling), ("silent", silent)):
        for _ in range(count):
            watched.open(kind)
            watched.watch(0)
    print(json.dumps({"event": "open", "open": len(watched.selector.get_map())}), flush=True)
    until = time.monotonic() + watch_s
    while watched.selector.get_map() and time.monotonic() < until:
        watched.watch(0.2)
    return watched.end()


def main() -> None:
    if sys.argv[1] == "--spray":
        print(json.dumps(spray(sys.argv[2:])), flush=True)
        return
    if sys.argv[1] == "--flood":
        print(json.dumps(flood(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))), flush=True)
        return
    address, secret = (sys.argv[1], int(sys.argv[2])), read_secret(sys.argv[3])
    results = {}
    threads = [threading.Thread(target=lambda: results.setdefault("silent", silent(address)))]
    threads[0].start()  # the longest: the whole handshake timeout, alongside the others
    results["wrong_secret"] = wrong_secret(address)
    results["garbage"] = garbage(address)
    results["replayed"] = replayed(address, secret)
    threads[0].join()
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
