"""The worker process's loop: `python -m parallel_backend.engine.worker --connect HOST:PORT --rank R --world N ...`
runs `main(argv, handlers)` here with the engine's handlers (engine/worker.py).

One process per device. It authenticates to the host (key in the TANDEM_AUTHKEY environment variable, never
on the command line), joins the workers' torch.distributed process group, then serves the host's requests:
load a model (once per fingerprint), run a share of a model call, unload, shutdown. It exits by itself when
the host goes away (its watch: worker_watch.py), so no worker outlives its host.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from .carry import CarriedStore
from .messages import (
    Carry,
    Hello,
    HoldsWeights,
    Load,
    Ping,
    Reply,
    RunSetup,
    Shutdown,
    StoreWeights,
    Unload,
)
from .sources import SourceRefused
from .portable import peak_memory_bytes, pin_to_cores, reset_peak_memory
from . import environment
from .weights_cache import WeightsCache, cached_payload, holds_weights, store_weights
from . import worker_watch

def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m parallel_backend.engine.worker")
    parser.add_argument("--connect", required=True, help="HOST:PORT of the pool's control listener")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--device", required=True, help="cpu or cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--cpus", default="", help="comma list of CPU cores to pin to")
    parser.add_argument("--rendezvous", required=True,
                        help="torch.distributed init_method (file://...), or tandem://HOST:PORT: the host's store")
    parser.add_argument("--tls", action="store_true", help="the host's listener encrypts (a pool across machines)")
    parser.add_argument("--pg-timeout", type=float, default=60.0, help="process-group timeout, seconds")
    parser.add_argument("--host-pid", type=int, default=0, help="exit when this process ends (0: don't watch)")
    parser.add_argument("--pool-dir", default="", help="the pool's folder: heartbeat file; removed if the host dies")
    parser.add_argument("--weights-cache", default="", help="another machine's worker: its weights cache folder")
    parser.add_argument("--weights-cache-bytes", type=int, default=0, help="that cache's bound, in bytes")
    parser.add_argument("--test-slowdown", type=float, default=1.0,
                        help="tests only: repeat heavy compute this many times, a stand-in for a slower card")
    return parser.parse_args(argv)


class WorkerState:
    """What one worker holds: its device, its models by fingerprint (as many as the host keeps), and per model
    each strategy's state (`slot`)."""

    def __init__(self, rank: int, world: int, device: str):
        import torch

        self.rank, self.world = rank, world
        self.device = torch.device(device)
        self.models: dict[str, tuple[object, str]] = {}  # fingerprint -> (module, family)
        self.slots: dict[tuple[str, str], object] = {}  # (fingerprint, owner) -> a strategy's worker-side state
        self._restore: dict[str, object] = {}  # fingerprint -> puts the model back whole after a strategy split it
        self.weights_cache = None  # another machine's worker: its machine's WeightsCache (weights_cache.py)
        # strategy name -> cut(state, module, family, cut) -> module: what a Load's `cut` asks (the worker program's)
        self.cutters: dict = {}
        self.carried = CarriedStore()  # host objects of model calls, by digest (carry.py)
        self.pool_dir: Path | None = None  # the pool's folder on this machine (a host's own workers only)

    def load(self, message: Load) -> dict:
        from .recipe import weights_bytes

        if self.weights_cache is not None and message.cached is None:
            what = f"the path {message.path!r}" if message.path is not None else "the host's own GPU memory"
            raise RuntimeError(f"a worker of `tandem worker serve` loads a model only from its machine's weights "
                               f"cache, by hash, not from {what}")
        if message.parts is not None and message.cut is None:
            raise RuntimeError("a Load that reads weights in part must name the cut that takes them")
        started, read = time.perf_counter(), 0
        for fingerprint in [f for f in self.models if f not in message.keep]:
            self._drop(fingerprint)
        if message.shared is None and self._short_of_memory(message.bytes):
            for fingerprint in list(self.models):
                self._drop(fingerprint)
        from .host_modules import register

        register(message.modules)
        if message.shared is not None:
            # The host's own copy on this GPU, mapped through CUDA IPC handles: nothing is copied.
            import pickle

            import torch.multiprocessing  # noqa: F401  (registers the tensor reductions)

            module = _materialize(pickle.loads(message.shared), self.device, self._cutter(message))
            module._tandem_shared_with_host = True  # never moved off the device (that would copy it)
        elif message.cached is not None:
            # Another machine's worker: its cache's entry, the tensors mapped from safetensors (shared pages).
            # A cut's entry (message.parts) holds only what this worker keeps.
            module = _materialize(cached_payload(self, message.cached, message.parts), self.device,
                                  self._cutter(message))
        else:
            # The host's file of this machine: the tensors mapped (CPU workers share its page-cache copy), only
            # the parts the cut keeps where the Load names them (tensor_parts.py); the weights `sources` names
            # from the file the host loaded them from, each checked against the host's digest (sources.py).
            try:
                payload, read = _read_payload(message)
            except SourceRefused as exc:  # the host writes the model and asks again (pool.py)
                return {"source_refused": str(exc), "held": list(self.models)}
            module = _materialize(payload, self.device, self._cutter(message))
        self.models[message.fingerprint] = (module, message.family)
        return {"seconds": time.perf_counter() - started, "held": list(self.models),
                "weights_bytes": weights_bytes(module, self.device), "bytes_read": read}

    def _cutter(self, message: Load):
        """module -> module cut as the Load asks (None: kept whole): one cut (name, ...) or several in order
        (a tensor cut, then its shards)."""
        if message.cut is None:
            return None
        cuts = (message.cut,) if isinstance(message.cut[0], str) else tuple(message.cut)
        for cut in cuts:
            if cut[0] not in self.cutters:
                raise RuntimeError(f"this worker cannot make a {cut[0]!r} cut of a model")

        def make(module):
            for cut in cuts:
                module = self.cutters[cut[0]](self, module, message.family, cut)
            return module

        return make

    def _short_of_memory(self, needed: int) -> bool:
        """A GPU whose free memory cannot take `needed` more bytes (with a margin) while the others stay."""
        if self.device.type != "cuda" or not self.models or not needed:
            return False
        import torch

        free, _ = torch.cuda.mem_get_info(self.device)
        return free < 1.2 * needed

    def _drop(self, fingerprint: str) -> None:
        sharded = _sharded(self.models.pop(fingerprint, (None,))[0])
        if sharded is not None:
            sharded.close()
        self._restore.pop(fingerprint, None)
        self.slots = {key: value for key, value in self.slots.items() if key[0] != fingerprint}
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def unload(self, message: Unload = None) -> dict:
        wanted = message.fingerprint if message is not None else None
        for fingerprint in [f for f in self.models if wanted in (None, f)]:
            self._drop(fingerprint)
        return {"held": list(self.models)}

    def model(self, fingerprint: str) -> tuple[object, str]:
        """(module, family) of the loaded model with this fingerprint."""
        if fingerprint not in self.models:
            raise RuntimeError(f"model {fingerprint[:12]} is not loaded on this worker")
        return self.models[fingerprint]

    def slot(self, fingerprint: str, owner: str, make):
        """`owner`'s state for the model `fingerprint` (made by `make()` on first use; dropped with the model)."""
        self.model(fingerprint)
        key = (fingerprint, owner)
        if key not in self.slots:
            self.slots[key] = make()
        return self.slots[key]

    def on_forward(self, fingerprint: str, restore) -> None:
        """Before the next plain forward of this model, call `restore()` (e.g. a stage placement puts the model
        back whole)."""
        self._restore[fingerprint] = restore

    def restores(self, fingerprint: str) -> bool:
        """Whether the next plain forward of this model first puts it back whole (on_forward)."""
        return fingerprint in self._restore

    def whole_model(self, fingerprint: str):
        """(module, family) of a loaded model, put back whole first if a strategy had split it (on_forward)."""
        restore = self._restore.pop(fingerprint, None)
        if restore is not None:
            restore()
        return self.model(fingerprint)

    def release_gathered(self) -> None:
        """After a failed request: frees the blocks a sharded model had gathered when the call stopped."""
        for module, _ in self.models.values():
            sharded = _sharded(module)
            if sharded is not None:
                sharded.release()

    def ping(self, message: Ping = None) -> dict:
        return {"pid": os.getpid()}

    def carry(self, message: Carry) -> dict:
        from .host_modules import register

        register(message.modules)
        self.carried.load(message.blobs)
        return {}

    def with_live_inputs(self, request):
        """`request` with the host objects its model call refers to (carry.CarriedRef) in place."""
        from dataclasses import replace

        from .calls import ModelCall

        call = getattr(request, "call", None)
        if not isinstance(call, ModelCall):
            return request
        return replace(request, call=replace(call, extras=self.carried.resolve(call.extras)))


# A module's flag, set by a cutter (asyncdiff's stage cut): it stays in host memory as it loads; its strategy
# moves to the device what it runs (strategies/asyncdiff/runner.py).
ON_HOST = "_tandem_on_host"


def _sharded(module):
    """The state a sharded model's worker keeps on the module (models/weight_shards.py `_tandem_sharded`), or
    None."""
    return getattr(module, "__dict__", {}).get("_tandem_sharded")


def _read_payload(message: Load) -> tuple[object, int]:
    """(payload, bytes of tensors read) of a Load from the host's files (shipping.write): the skeleton beside the
    safetensors file `message.path` (or `path` itself, where every tensor is read from `message.sources`), with
    every tensor, or only the parts `message.parts` names; those `message.sources` names read from the file the
    host loaded them from (sources.read: raises SourceRefused where they differ from the host's)."""
    from pathlib import Path

    from .cache_format import join_tensors
    from .sources import read as read_sources
    from .tensor_parts import read

    path, parts, sources = Path(message.path), message.parts or {}, message.sources or {}
    skeleton = path.with_suffix(".skeleton").read_bytes()
    tensors, nbytes = {}, 0
    if sources:
        tensors, nbytes = read_sources(sources, parts)
    if path.suffix != ".skeleton":
        written, more = read(path, {name: part for name, part in parts.items() if name not in sources})
        tensors.update(written)
        nbytes += more
    return join_tensors(skeleton, tensors), nbytes


def _materialize(payload, device, cut=None):
    """The module a Load delivered: a recipe built and loaded (recipe.py), or the pickled module itself, on
    `device`, in eval mode without gradients. `cut(module) -> module`: made on the CPU (a mapped file's pages, a
    recipe built there) before the module moves, so the device holds only the cut. A recipe that asks for
    torch.compile gets its compiled forward beside it (`_tandem_compiled`, compiled at the first call of each
    shape), used for whole calls."""
    from .recipe import Recipe

    from .tensor_parts import check_bound

    if not isinstance(payload, Recipe):
        module = payload if cut is None else cut(payload.eval().requires_grad_(False))
        check_bound(module)  # a weight read in part that no cut took: refused, never computed on
        return _to_device(module, device).eval().requires_grad_(False)
    module = payload.make(device if cut is None else "cpu")
    if cut is not None:
        module = cut(module)
        check_bound(module)
        module = _to_device(module, device)
    if payload.compile is not None:
        import torch

        module.__dict__["_tandem_compiled"] = torch.compile(module, **payload.compile)  # not a submodule
    return module


def _to_device(module, device):
    """`module` on `device`, unless its cut keeps it in host memory (ON_HOST)."""
    return module if module.__dict__.get(ON_HOST) else module.to(device)


def run_setup(state: WorkerState, message: RunSetup) -> dict:
    """Loads a host-provided python file by path (no package name to collide with) and calls function(argument)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tandem_worker_setup_{abs(hash(message.path))}", message.path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    getattr(module, message.function)(message.argument)
    return {}


# What every worker answers, whatever runs on it; the worker program adds model calls and strategies
# (engine/worker.py's handlers()).
RUNTIME_HANDLERS = {Load: WorkerState.load, Unload: WorkerState.unload, Ping: WorkerState.ping, RunSetup: run_setup,
                    Carry: WorkerState.carry, HoldsWeights: holds_weights, StoreWeights: store_weights}


def serve(channel, state: WorkerState, handlers: dict) -> bool:
    """Answers requests, one handler per message type (`handlers`: type -> handler(state, request)), until told to
    shut down (returns False) or the host's end closes (returns True: the host is gone, or tearing the pool
    down)."""
    from .transport import ChannelClosed

    while True:
        try:
            request = channel.recv()
        except ChannelClosed:
            return True
        if isinstance(request, Shutdown):
            channel.send(Reply())
            return False
        started = time.perf_counter()
        try:
            handler = handlers.get(type(request))
            if handler is None:
                raise TypeError(f"unknown request {type(request).__name__}")
            if not isinstance(request, Ping):  # a ping reports the last request's peak
                reset_peak_memory(state.device)
            value = handler(state, state.with_live_inputs(request))
            reply = Reply(value=value, seconds=time.perf_counter() - started, peak_bytes=peak_memory_bytes(state.device))
        except Exception as exc:  # reported to the host, which names this worker and the call
            state.release_gathered()
            reply = Reply(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(),
                          seconds=time.perf_counter() - started)
        channel.send(reply)


def main(argv, handlers: dict, cutters: dict | None = None) -> int:
    """The worker process: argv as pool.spawn_worker gives it; handlers: what it answers (serve); cutters: the
    cuts a Load may ask for (WorkerState.cutters)."""
    args = _parse_args(argv)
    worker_watch.start(args.host_pid, args.pool_dir, args.rank)  # running already where the worker started it early
    if args.cpus:
        pin_to_cores(int(c) for c in args.cpus.split(","))
    authkey = bytes.fromhex(environment.take("TANDEM_AUTHKEY"))
    if not authkey:
        print("parallel_backend.engine.worker: TANDEM_AUTHKEY is not set; workers are started by a WorkerPool",
              file=sys.stderr)
        return 2

    import torch

    from . import primitives
    from .slowdown import repeating
    from .transport import connect

    # Test settings, read once here: an exchange or a request never looks them up (primitives, slowdown.py).
    primitives.pair_in_issue_order(environment.text("TANDEM_STRICT_P2P") == "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    host, port = args.connect.rsplit(":", 1)
    channel = connect((host, int(port)), authkey, f"host (worker {args.rank})", tls=args.tls)
    channel.send(Hello(args.rank, os.getpid()))
    try:
        store = None
        if args.rendezvous.startswith("tandem://"):
            from .store_relay import RelayStore

            store = RelayStore(args.rendezvous, authkey, args.pg_timeout)
        primitives.join_group(args.rendezvous, args.rank, args.world, args.device, args.pg_timeout, store=store)
        channel.send(Reply())
    except Exception as exc:
        channel.send(Reply(ok=False, error=f"joining the process group failed: {type(exc).__name__}: {exc}"))
        return 1
    host_left = False
    state = WorkerState(args.rank, args.world, args.device)
    state.cutters = dict(cutters or {})
    state.pool_dir = Path(args.pool_dir) if args.pool_dir else None
    if args.weights_cache:
        state.weights_cache = WeightsCache(args.weights_cache, args.weights_cache_bytes)
    try:
        with repeating(args.test_slowdown):  # a test's slower card: for the worker's life, not per request
            host_left = serve(channel, state, handlers)
    finally:
        primitives.leave_group()
        channel.close()
        if host_left and args.pool_dir:  # a host that died cannot remove its pool's folder; one tearing down will
            shutil.rmtree(args.pool_dir, ignore_errors=True)
    return 0
