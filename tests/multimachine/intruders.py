"""Connections that must be refused by `tandem worker serve` (run in the host's namespace against ADDRESS:PORT):
a wrong secret, a plain TCP client sending garbage, a client that connects and says nothing, and the bytes of
a real client's handshake replayed. Prints one JSON object: per intruder, whether it was refused and how long
the daemon took to drop it.

    intruders.py ADDRESS PORT SECRET_FILE
    intruders.py --spray ADDRESS:PORT...   (garbage to each listener, and a connection left silent for 2 s)
"""

from __future__ import annotations

import json
import os
import socket
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


def main() -> None:
    if sys.argv[1] == "--spray":
        print(json.dumps(spray(sys.argv[2:])), flush=True)
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
