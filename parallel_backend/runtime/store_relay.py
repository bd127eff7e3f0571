"""The workers' torch.distributed rendezvous store, kept by the host and reached over the authenticated TLS
channel, for pools that span machines.

torch's TCPStore listens on every interface of the machine that runs it and has no authentication; this
store instead lives in the host process (`StoreServer`, a dict behind a condition) and each worker reaches it
through `RelayStore`, a `torch.distributed.Store` whose operations travel over a `transport.Listener`
connection (TLS + the pool's key, secure.py). Only small keys (gloo's and NCCL's addresses) cross it; the
tensors still go between the devices over gloo/NCCL. It stays up for the pool's life: NCCL reads it lazily.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import torch.distributed as dist

from .transport import Channel, ChannelClosed, Listener, connect

SCHEME = "tandem://"


class StoreServer:
    """The keys of one pool's process group, served to authenticated workers on `host` (the configured
    interface's address) from a thread of the host; `address` is where it listens. close() ends it."""

    def __init__(self, authkey: bytes, host: str, tls):
        self._data: dict[str, bytes] = {}
        self._changed = threading.Condition()
        self._closed = False
        self._channels: list[Channel] = []
        # Each connection's handshake in a thread of its own, bounded as a whole, at most so many at once
        # (doorway.py): a stranger delays no worker; then its requests in that thread.
        self._listener = Listener(authkey, host, 0, tls=tls, what="the pool's rendezvous store",
                                  arrived=self._arrived)
        self.address = self._listener.address

    @property
    def init_method(self) -> str:
        return f"{SCHEME}{self.address[0]}:{self.address[1]}"

    def _arrived(self, conn, peer) -> None:
        channel = Channel(conn, "store client")
        if self._closed:  # its handshake ended after close()
            channel.close()
            return
        self._channels.append(channel)
        self._serve(channel)

    def _serve(self, channel: Channel) -> None:
        while not self._closed:
            try:
                op, args = channel.recv()
                channel.send(("ok", getattr(self, f"_op_{op}")(*args)))
            except ChannelClosed:
                return
            except Exception as exc:  # answered: the worker's store call raises it
                try:
                    channel.send(("error", f"{type(exc).__name__}: {exc}"))
                except ChannelClosed:
                    return

    def _op_set(self, key: str, value: bytes) -> None:
        with self._changed:
            self._data[key] = bytes(value)
            self._changed.notify_all()

    def _op_wait(self, keys: list[str], timeout_s: float) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: all(k in self._data for k in keys) or self._closed, timeout_s):
                raise TimeoutError(f"keys {keys} were not set within {timeout_s:g} s")

    def _op_get(self, key: str, timeout_s: float) -> bytes:
        self._op_wait([key], timeout_s)
        with self._changed:
            return self._data[key]

    def _op_add(self, key: str, amount: int) -> int:
        with self._changed:
            value = int(self._data.get(key, b"0")) + amount
            self._data[key] = str(value).encode()
            self._changed.notify_all()
            return value

    def _op_compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        with self._changed:
            current = self._data.get(key)
            if (current is None and not expected) or current == bytes(expected):
                self._data[key] = bytes(desired)
                self._changed.notify_all()
                return bytes(desired)
            return current if current is not None else bytes(expected)

    def _op_check(self, keys: list[str]) -> bool:
        with self._changed:
            return all(k in self._data for k in keys)

    def _op_delete_key(self, key: str) -> bool:
        with self._changed:
            return self._data.pop(key, None) is not None

    def _op_num_keys(self) -> int:
        with self._changed:
            return len(self._data)

    def close(self) -> None:
        self._closed = True
        with self._changed:
            self._changed.notify_all()
        self._listener.close()
        for channel in self._channels:
            channel.close()


class RelayStore(dist.Store):
    """Worker side: a torch.distributed Store whose every operation is answered by the host's StoreServer."""

    def __init__(self, init_method: str, authkey: bytes, timeout_s: float):
        super().__init__()
        host, port = init_method.removeprefix(SCHEME).rsplit(":", 1)
        self._channel = connect((host, int(port)), authkey, "the host's rendezvous store", tls=True)
        self._lock = threading.Lock()
        self._timeout_s = timeout_s

    def _call(self, op: str, *args):
        with self._lock:
            self._channel.send((op, args))
            status, value = self._channel.recv(timeout=self._timeout_s + 10.0)
        if status != "ok":
            raise RuntimeError(f"rendezvous store, {op}: {value}")
        return value

    def set(self, key, value):
        self._call("set", key, value.encode() if isinstance(value, str) else bytes(value))

    def get(self, key):
        return self._call("get", key, self._timeout_s)

    def add(self, key, amount):
        return self._call("add", key, int(amount))

    def compare_set(self, key, expected, desired):
        as_bytes = lambda v: v.encode() if isinstance(v, str) else bytes(v)  # noqa: E731
        return self._call("compare_set", key, as_bytes(expected), as_bytes(desired))

    def wait(self, keys, timeout=None):
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else self._timeout_s
        self._call("wait", list(keys), seconds)

    def check(self, keys):
        return self._call("check", list(keys))

    def delete_key(self, key):
        return self._call("delete_key", key)

    def num_keys(self):
        return self._call("num_keys")

    def set_timeout(self, timeout):
        self._timeout_s = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)

