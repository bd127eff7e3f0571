"""`tandem worker serve`: keeps this machine's devices ready for one host's pool at a time
(docs/multi-machine.md).

It listens on the given address only, over TLS, and serves a host that proves the shared secret (secure.py;
every other connection is refused, logged, and the daemon goes on). Strangers cannot knock it over (doorway.py):
each handshake is bounded as a whole, connections beyond MAX_HANDSHAKES under way are closed at once, and running
out of descriptors is survived. The host's Join names the ranks and devices it wants; the daemon checks that both
machines run the same versions, then starts one ordinary pool worker per device (`python -m
parallel_backend.engine.worker`, the same program as on the host) that connects back to the host's listener over
TLS. While the host is there the daemon reports its workers' state every STATUS_PERIOD_S; when the host goes (its
connection closes, or it is silent for LINK_TIMEOUT_S) the daemon kills the workers and removes their folder, then
waits for the next host. Workers watch the daemon's process too, so killing the daemon leaves none behind. The
workers share this machine's weights cache (--cache-dir, --cache-size; weights_cache.py): a model is sent to the
machine once and survives restarts of either side.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

from . import pool_files
from .messages import Join, KeepAlive, KillWorkers, MachineStatus, Reply, WorkerStatus
from .pool import core_shares, spawn_worker
from .addresses import listen_address, serve_interface
from .remote import STATUS_PERIOD_S, link_timeout_s, versions
from .devices import parse_devices, resolve_devices, split_device
from .worker_handle import log_tail
from .doorway import BACKLOG, HANDSHAKE_TIMEOUT_S, Doorway
from .secure import accept_tls, certificate_for, read_secret, server_context
from .transport import Channel, ChannelClosed
from .weights_cache import DEFAULT_SIZE_GIB, WeightsCache, cache_lines, cache_size_bytes, default_cache_dir
from .worker_watch import heartbeat_path
from .words import counted

log = logging.getLogger("tandem")


def comfyui_version(root: str | None) -> str | None:
    """The version in ComfyUI's comfyui_version.py under `root` (None: no ComfyUI given)."""
    if not root:
        return None
    try:
        text = (Path(root) / "comfyui_version.py").read_text()
    except OSError:
        raise ValueError(f"--comfyui {root!r}: no comfyui_version.py there; give ComfyUI's root folder") from None
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    return match.group(1) if match else "unknown"


def version_mismatch(host: dict, mine: dict) -> str | None:
    """One sentence on how the host's versions differ from this machine's, or None when they match."""
    if host.get("tandem") != mine["tandem"]:
        return (f"this machine runs Tandem {mine['tandem']} and the host Tandem {host.get('tandem')}: install the "
                "same version on every machine of the pool")
    if host.get("comfyui") != mine["comfyui"]:
        theirs, ours = host.get("comfyui") or "no ComfyUI", mine["comfyui"] or "no ComfyUI"
        return (f"the host runs {('ComfyUI ' + theirs) if host.get('comfyui') else theirs} and this machine has "
                f"{('ComfyUI ' + ours) if mine['comfyui'] else ours} (--comfyui): use the same ComfyUI version on "
                "every machine of the pool")
    return None


class ServeDaemon:
    """This machine's devices, served to one host at a time from `listen` (ADDRESS:PORT or NAME:PORT; 0.0.0.0, every
    interface, only with `interface`: addresses.py)."""

    def __init__(self, listen: str, devices: str, secret_file: str, interface: str | None = None,
                 comfyui: str | None = None, cache_dir: str | None = None, cache_size_gib=DEFAULT_SIZE_GIB):
        self.host, self.port = listen_address(listen)  # a name resolved to its IPv4 address
        self.interface = serve_interface(self.host, self.port, interface)
        self.devices = parse_devices(devices)
        if any(split_device(d)[0] is not None for d in self.devices):
            raise ValueError(f"--devices {devices!r}: name this machine's own devices (cpu:2, cuda:0,cuda:1)")
        self.devices = resolve_devices(self.devices)
        self.secret = read_secret(secret_file)
        self.comfyui = comfyui
        self.versions = {**versions(), "comfyui": comfyui_version(comfyui)}
        self.cache = WeightsCache(cache_dir or default_cache_dir(), cache_size_bytes(cache_size_gib))
        self.tls = server_context(*certificate_for(secret_file))
        self.sock = socket.create_server((self.host, self.port), backlog=BACKLOG)
        self.port = self.sock.getsockname()[1]
        # Connections come in through a doorway (doorway.py): each handshake in a thread of its own and within
        # HANDSHAKE_TIMEOUT_S as a whole, at most MAX_HANDSHAKES at once (more are closed at once), accept()'s
        # errors (out of descriptors) survived; what is refused or turned away is said a few lines at a time.
        self.doorway = Doorway(self.sock, f"tandem worker serve on {self.host}:{self.port}", self._handshake,
                               self._serve_host)
        self._session_lock = threading.Lock()

    def serve_forever(self) -> None:
        log.warning("Tandem: serving %s on %s:%d (TLS; gloo/NCCL on %s) for one host at a time",
                    ",".join(self.devices), self.host, self.port, self.interface)
        stale = self.cache.remove_stale()  # uploads cut short by a kill, an older Tandem's entries
        entries = self.cache.entries()
        log.warning("Tandem: weights cache %s: %s, %.2f of %.2f GiB (%s removed)",
                    self.cache.folder, counted(len(entries), "model"), sum(size for _, size, _ in entries) / 2**30,
                    self.cache.limit / 2**30, counted(stale, "stale file"))
        self.doorway.run()

    def stop(self) -> None:
        self.doorway.close()

    def _handshake(self, raw: socket.socket):
        return accept_tls(raw, self.secret, self.tls, HANDSHAKE_TIMEOUT_S)

    def _serve_host(self, conn, peer) -> None:
        """One authenticated host, in its handshake's thread: its session, unless another host's runs."""
        channel = Channel(conn, f"host {peer[0]}")
        try:
            if not self._session_lock.acquire(blocking=False):
                channel.send(Reply(ok=False, error="this machine's workers already serve another host; stop that "
                                                   "pool first (one host at a time)"))
                log.warning("Tandem: refused host %s: already serving another host", peer[0])
                return
            try:
                Session(self, channel, peer[0]).run()
            finally:
                self._session_lock.release()
        except (ChannelClosed, TimeoutError) as exc:
            log.warning("Tandem: host %s left (%s)", peer[0], exc)
        finally:
            channel.close()


class Session:
    """One host's workers on this machine, from its Join until it goes."""

    def __init__(self, daemon: ServeDaemon, channel: Channel, peer: str):
        self.daemon, self.channel, self.peer = daemon, channel, peer
        self.workers: dict[int, tuple] = {}  # rank -> (process, log path)
        self.relayed: dict[int, int] = {}  # rank -> the bytes of its log read for cache_lines
        self.folder: Path | None = None

    def run(self) -> None:
        join = self.channel.recv(timeout=HANDSHAKE_TIMEOUT_S)
        problem = self._check(join)
        if problem:
            log.warning("Tandem: refused host %s: %s", self.peer, problem)
            self.channel.send(Reply(ok=False, error=problem))
            return
        try:
            self._start(join)
            self.channel.send(Reply(value={"pids": {r: p.pid for r, (p, _) in self.workers.items()}}))
            log.warning("Tandem: serving host %s: workers %s", self.peer, sorted(self.workers))
            self._follow()
        finally:
            self._stop()

    def _check(self, join) -> str | None:
        if not isinstance(join, Join):
            return f"expected a Join, got {type(join).__name__}"
        mismatch = version_mismatch(join.versions, self.daemon.versions)
        if mismatch:
            return mismatch
        served = list(self.daemon.devices)
        for device in join.devices:
            if device not in served:
                return (f"the host asks for {','.join(join.devices)} and this machine serves "
                        f"{','.join(self.daemon.devices)}")
            served.remove(device)
        return None

    def _start(self, join: Join) -> None:
        self.folder = pool_files.make_pool_folder()
        cpus = [r for r, d in zip(join.ranks, join.devices) if d == "cpu"]
        shares = dict(zip(cpus, core_shares(len(cpus))))
        import_paths = (self.daemon.comfyui,) if self.daemon.comfyui else ()
        for rank, device in zip(join.ranks, join.devices):
            self.workers[rank] = spawn_worker(
                rank, join.world, device, join.connect, join.rendezvous, self.folder, join.authkey,
                pg_timeout_s=join.pg_timeout, watch_pid=os.getpid(), interface=self.daemon.interface,
                import_paths=import_paths, cores=shares.get(rank, ()), tls=True,
                weights_cache=(str(self.daemon.cache.folder), self.daemon.cache.limit))

    def _status(self) -> MachineStatus:
        import psutil

        workers = {}
        for rank, (process, log_path) in self.workers.items():
            code = process.poll()
            try:
                silent = max(0.0, time.time() - heartbeat_path(self.folder, rank).stat().st_mtime)
            except OSError:
                silent = 0.0
            try:
                stopped = code is None and psutil.Process(process.pid).status() == psutil.STATUS_STOPPED
            except (psutil.Error, OSError):  # OSError: /proc cannot be opened while descriptors run out (a flood)
                stopped = False
            workers[rank] = WorkerStatus(code, silent, stopped, log_tail(log_path) if code is not None else "")
        return MachineStatus(workers)

    def _follow(self) -> None:
        """Reports the workers' state and reads the host's keep-alives until the host goes."""
        heard = time.monotonic()
        while True:
            self.channel.send(self._status())
            self._relay_cache_lines()
            until = time.monotonic() + STATUS_PERIOD_S
            while (left := until - time.monotonic()) > 0:
                if not self.channel.poll(left):
                    continue
                message = self.channel.recv(timeout=link_timeout_s())
                heard = time.monotonic()
                if isinstance(message, KillWorkers):
                    for rank in message.ranks:
                        if rank in self.workers:
                            self.workers[rank][0].kill()
                elif not isinstance(message, KeepAlive):
                    log.warning("Tandem: host %s sent an unexpected %s", self.peer, type(message).__name__)
            if time.monotonic() - heard > link_timeout_s():
                log.warning("Tandem: host %s silent for %.0f s: its link is down or it stopped", self.peer,
                            time.monotonic() - heard)
                return

    def _relay_cache_lines(self) -> None:
        """The workers' lines about the weights cache, into this daemon's log (weights_cache.cache_lines)."""
        for rank, (_, log_path) in self.workers.items():
            lines, self.relayed[rank] = cache_lines(log_path, self.relayed.get(rank, 0))
            for line in lines:
                log.warning("%s (worker %d)", line, rank)

    def _stop(self) -> None:
        processes = [p for p, _ in self.workers.values()]
        for process in processes:
            if process.poll() is None:
                process.kill()
        pool_files.kill_and_remove(processes, None)
        self._relay_cache_lines()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        if self.workers:
            log.warning("Tandem: host %s gone; its %s stopped; waiting for the next host", self.peer,
                        counted(len(self.workers), "worker"))


def main(listen: str, devices: str, secret_file: str, interface: str | None = None, comfyui: str | None = None,
         cache_dir: str | None = None, cache_size_gib=DEFAULT_SIZE_GIB) -> int:
    """Runs `tandem worker serve` until interrupted."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    daemon = ServeDaemon(listen, devices, secret_file, interface, comfyui, cache_dir, cache_size_gib)
    try:
        daemon.serve_forever()
    finally:
        daemon.stop()
    return 0

