"""Tandem's process-wide state inside ComfyUI: the worker pool, how and when it starts, the last run's figures.

The pool starts from the pack's entry point (never at import), in a background thread, unless
TANDEM_POOL_START says otherwise: on_load (default), on_first_use, off. TANDEM_DEVICES picks the devices
(default auto). A TANDEM_* variable its rule refuses (runtime/environment.py) starts no pool: Tandem's nodes fail
with the sentence naming it. Workers import the host's ComfyUI, so they can hold ComfyUI's own model classes.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from parallel_backend.runtime import environment
from parallel_backend.runtime.pool import WorkerError, WorkerPool
from parallel_backend.runtime.devices import PoolUnavailable, check_devices_exist, parse_devices, resolve_devices
from parallel_backend.runtime.pool_settings import check_environment

log = logging.getLogger("tandem")
# What `get_pool` raises when the pool cannot take calls now, a node's cue to take the stock path saying why: the
# pool is switched off, or its devices cannot be used here or reached (PoolUnavailable); a worker did not start,
# join its group or run the host's set-up (WorkerError, naming it); the OS refused a process, a port, a file or
# a connection (OSError). Any other error is a fault (a bug, a setting to change) and fails the run.
UNAVAILABLE = (PoolUnavailable, WorkerError, OSError)


def _comfy_root() -> str:
    import comfy  # a namespace package in ComfyUI's tree: it has a __path__, not a __file__

    return str(Path(list(comfy.__path__)[0]).resolve().parent)


def _still_loaded(watched: tuple) -> bool:
    """Whether the host model of `watched` (weak reference, weights id) is alive with the same weights. The strong
    reference it takes ends with this function."""
    model = watched[0]()
    return model is not None and f"{id(model)}:{model.current_weight_patches_uuid}" == watched[1]


def _copies(fingerprint: str, held) -> list[str]:
    """The copies the workers hold of the host model `fingerprint`: the whole one, and each cut of it (a
    strategy's or sharded weights': the engine holds those as `fingerprint~LAYOUT`, Engine._fingerprint_as)."""
    return [f for f in held if f == fingerprint or f.startswith(f"{fingerprint}~")]


class Runtime:
    def __init__(self):
        self.lock = threading.RLock()
        self.devices, self.mode, self.setting_error = "auto", "on_load", None
        try:  # every TANDEM_* variable, by its rule: a wrong one fails Tandem's nodes, naming it, until changed
            check_environment()
            self.devices = environment.text("TANDEM_DEVICES")
            self.mode = environment.check("TANDEM_POOL_START")
        except ValueError as exc:
            self.mode, self.setting_error = "on_first_use", str(exc)
            log.error("Tandem: %s; Tandem's nodes fail until it is changed (ComfyUI's own nodes run as usual)", exc)
        self.pool: WorkerPool | None = None
        self.error: str | None = self.setting_error
        self.last_run: dict = {}
        self.runs = 0  # sampling runs that went through the pool
        # per model the workers hold (fingerprint): (weakref to the host's BaseModel, its weights id)
        self._watched: dict[str, tuple] = {}
        self._watcher: threading.Thread | None = None

    def start_on_load(self) -> None:
        if self.mode == "on_load":
            threading.Thread(target=self._start_quietly, name="tandem-pool-start", daemon=True).start()

    def _start_quietly(self) -> None:
        try:
            self.get_pool(self.devices)
        except Exception as exc:  # reported in the log and on /tandem/status; a run meets it again in get_pool
            log.warning("Tandem: the worker pool did not start: %s", exc)

    def named_devices(self, devices: str) -> tuple[str, ...]:
        """The devices a node's `devices` setting names: its own, or for 'auto' the pack's default
        (TANDEM_DEVICES when set, else auto)."""
        parsed = parse_devices(devices)
        return parse_devices(self.devices) if parsed == ("auto",) else parsed

    def check_devices(self, devices: str) -> None:
        """Raises ValueError naming the devices of `devices` that this machine lacks: a run that names them fails
        rather than taking the stock path. Nothing to check while the pool is off."""
        if self.setting_error:
            raise ValueError(self.setting_error)
        if self.mode != "off":
            check_devices_exist(self.named_devices(devices))

    def get_pool(self, devices: str) -> WorkerPool:
        """The running pool for `devices` (started, or restarted after a failure). A pool restarts only when the
        resolved devices differ ('auto' and 'cpu:2' may be the same two workers); devices that do not exist
        raise before the running pool is touched. Raises one of UNAVAILABLE when the pool cannot take calls now."""
        with self.lock:
            if self.setting_error:  # a fault, not a refusal: the run fails with the sentence naming the variable
                raise ValueError(self.setting_error)
            if self.mode == "off":
                raise PoolUnavailable("the Tandem pool is off (TANDEM_POOL_START=off)")
            wanted = resolve_devices(self.named_devices(devices))
            if self.pool is not None and self.pool.requested_devices != wanted:
                log.info("Tandem: restarting the worker pool for other devices: %s -> %s",
                         ",".join(self.pool.requested_devices), ",".join(wanted))
                self.pool.shutdown()
                self.pool = None
            if self.pool is None:
                from comfy.cli_args import args

                setup = (str(Path(__file__).with_name("worker_setup.py")), "configure", dict(vars(args)))
                self.pool = WorkerPool(wanted, import_paths=(_comfy_root(),), worker_setup=setup)
            started = time.perf_counter()
            try:
                if not self.pool.started:
                    self.pool.start()
                    log.info("Tandem: %d workers ready on %s in %.1f s", len(self.pool.devices),
                             ",".join(self.pool.devices), time.perf_counter() - started)
                self.error = None
            except Exception as exc:
                self.error = str(exc)
                raise
            return self.pool

    def call_index(self, run_id: int) -> int:
        """The number of the next model call of sampling run `run_id` (0 for a new run)."""
        return self.last_run["calls"] if self.last_run.get("id") == run_id else 0

    def record_call(self, run_id: int, devices: list, mesh, seconds: float, compute: dict,
                    extra: dict | None = None) -> None:
        """Per-call figures of the current sampling run (a new run id starts a new record); `mesh`: the call's
        (parallel_backend.engine.mesh.Mesh); extra: each rank's own counters (a worker's torch.compile graphs so far,
        where it compiles)."""
        with self.lock:
            if self.last_run.get("id") != run_id:
                self.runs += 1
                self.last_run = {"id": run_id, "calls": 0, "seconds": [], "devices": devices, "started": time.time()}
            run = self.last_run
            # the latest call's (auto's first calls run on one device); devices_used 1: nothing was split
            run.update(strategy=mesh.strategy, mesh=mesh.describe(), devices_used=mesh.size)
            run["calls"] += 1
            run["seconds"].append(round(seconds, 6))
            run["device_seconds"] = run.get("device_seconds", 0.0) + sum(compute.values())
            run["wall_seconds"] = run.get("wall_seconds", 0.0) + seconds
            run["median_seconds_per_call"] = sorted(run["seconds"])[len(run["seconds"]) // 2]
            graphs = {rank: e["compiled_graphs"] for rank, e in (extra or {}).items() if "compiled_graphs" in e}
            if graphs:
                run["compiled_graphs"] = [graphs.get(rank) for rank in range(len(devices))]
            # How busy the devices were: their compute time over the wall time they were held for. A utilisation,
            # not a speed-up (that needs a one-device run: `tandem workflow compare` measures it).
            run["device_utilisation"] = round(run["device_seconds"] / (run["wall_seconds"] * len(devices)), 3)

    def watch(self, pool: WorkerPool, fingerprint: str, base_model_ref, weights: str) -> None:
        """Remembers which host model the workers' copy `fingerprint` belongs to (the engine ships it with the call
        when they lack it; the pool keeps up to two); a watcher releases a copy once ComfyUI unloads its model
        (free memory, another checkpoint, eviction): its weights are then unpatched (current_weight_patches_uuid
        changes) or the model is gone. Called before the call, under the lock, so the watcher never releases a copy
        that is about to be used anew. No request to the pool: it reads which copies the pool holds."""
        with self.lock:
            held = pool.loaded_fingerprints  # the pool may have dropped older copies to make room
            self._watched = {f: w for f, w in self._watched.items() if _copies(f, held)}
            self._watched[fingerprint] = (base_model_ref, weights)
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch_loop, name="tandem-release-watch", daemon=True)
                self._watcher.start()

    def _watch_loop(self, period_s: float = 2.0) -> None:
        # Holds only weak references while it sleeps: a strong one would keep a model ComfyUI dropped alive
        # (ComfyUI then warns of a memory leak) and the workers' copy with it.
        while True:
            time.sleep(period_s)
            for fingerprint, watched in list(self._watched.items()):
                if not _still_loaded(watched):
                    self._release_unless_replaced(fingerprint, watched)

    def _release_unless_replaced(self, fingerprint: str, watched: tuple) -> None:
        with self.lock:
            if self._watched.get(fingerprint) is not watched:
                return  # loaded anew meanwhile: its copy stays
            del self._watched[fingerprint]
            copies = _copies(fingerprint, self.pool.loaded_fingerprints) if self.pool is not None else []
            if not copies:
                return  # never loaded (the workers refused it), or dropped already
            try:
                for copy in copies:
                    self.pool.release_models(copy)
                log.info("Tandem: ComfyUI unloaded a model; the workers released their copies of it")
            except Exception as exc:  # the pool restarts on the next job anyway
                log.warning("Tandem: could not release the workers' model copies: %s", exc)

    def release_models(self) -> None:
        with self.lock:
            self._watched = {}
            if self.pool is not None and self.pool.started:
                self.pool.release_models()

    def status(self) -> dict:
        pool = self.pool
        return {"mode": self.mode, "devices": list(pool.devices) if pool else list(parse_devices(self.devices)),
                "state": "running" if pool and pool.started else ("error" if self.error else "stopped"),
                "error": self.error, "worker_pids": pool.worker_pids() if pool else [],
                "model_loaded": bool(pool and pool.loaded_fingerprint),
                # per worker, in device order: CUDA max allocated, CPU max resident set (shared weights count)
                "peak_memory_bytes": [pool.peak_memory.get(rank) for rank in range(len(pool.devices))] if pool else [],
                # per worker, in device order: the bytes of the weights of the models it holds, and of the model
                # used last (quantized weights count as stored: a GGUF Q8 model about its file's size)
                "weights_bytes": [sum(held.get(rank, 0) for held in pool.weights_bytes.values())
                                  for rank in range(len(pool.devices))] if pool else [],
                "model_weights_bytes": [pool.weights_bytes.get(pool.loaded_fingerprint, {}).get(rank, 0)
                                        for rank in range(len(pool.devices))] if pool else [],
                "stats": vars(pool.stats) if pool else {}, "runs": self.runs, "last_run": self.last_run}

    def shutdown(self) -> None:
        with self.lock:
            if self.pool is not None:
                self.pool.shutdown()


RUNTIME = Runtime()
