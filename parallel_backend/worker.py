"""A pool worker: `python -m parallel_backend.worker --connect HOST:PORT --rank R --world N --device D ...`.

One process per device. It authenticates to the host (key in the TANDEM_AUTHKEY environment variable, never
on the command line), joins the workers' torch.distributed process group, then serves the host's requests:
load a model (once per fingerprint), run a share of a model call, unload, shutdown. It exits by itself when
the host goes away, so no worker outlives its host.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback

from .messages import Computed, Forward, Hello, Load, Ping, Reply, RunSetup, Shutdown, Unload
from .models.stages import synchronize
from .portable import peak_memory_bytes, pin_to_cores, process_alive, reset_peak_memory

WATCHDOG_PERIOD_S = 0.5


def _watch_host(host_pid: int) -> None:
    """Ends this process as soon as the host process is gone (killed, crashed, exited without shutdown)."""
    while True:
        time.sleep(WATCHDOG_PERIOD_S)
        if not process_alive(host_pid):
            os._exit(3)


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m parallel_backend.worker")
    parser.add_argument("--connect", required=True, help="HOST:PORT of the pool's control listener")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--device", required=True, help="cpu or cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--cpus", default="", help="comma list of CPU cores to pin to")
    parser.add_argument("--rendezvous", required=True, help="torch.distributed init_method (file://...)")
    parser.add_argument("--pg-timeout", type=float, default=60.0, help="process-group timeout, seconds")
    parser.add_argument("--host-pid", type=int, default=0, help="exit when this process ends (0: don't watch)")
    return parser.parse_args(argv)


class WorkerState:
    """What one worker holds: its device, its model by fingerprint, and per-strategy state (`slot`)."""

    def __init__(self, rank: int, world: int, device: str):
        import torch

        self.rank, self.world = rank, world
        self.device = torch.device(device)
        self.models: dict[str, tuple[object, str]] = {}  # fingerprint -> (module, family)
        self.slots: dict[str, object] = {}  # a strategy's worker-side state for the loaded model
        self._restore = None  # puts the whole model back on the device after a strategy moved parts of it

    def load(self, message: Load) -> dict:
        import torch

        started = time.perf_counter()
        if message.shared is not None:
            # The host's own copy on this GPU, mapped through CUDA IPC handles: nothing is copied.
            import pickle

            import torch.multiprocessing  # noqa: F401  (registers the tensor reductions)

            module = pickle.loads(message.shared).eval().requires_grad_(False)
            module._tandem_shared_with_host = True  # never moved off the device (that would copy it)
        else:
            # mmap: CPU workers share the host's page-cache copy instead of each holding their own.
            module = torch.load(message.path, mmap=True, map_location="cpu", weights_only=False)
            module = module.to(self.device).eval().requires_grad_(False)
        self.models = {message.fingerprint: (module, message.family)}  # one model at a time
        self.slots, self._restore = {}, None
        return {"seconds": time.perf_counter() - started}

    def unload(self, message: Unload = None) -> dict:
        self.models.clear()
        self.slots, self._restore = {}, None
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        return {}

    def model(self, fingerprint: str) -> tuple[object, str]:
        """(module, family) of the loaded model with this fingerprint."""
        if fingerprint not in self.models:
            raise RuntimeError(f"model {fingerprint[:12]} is not loaded on this worker")
        return self.models[fingerprint]

    def slot(self, owner: str, make):
        """`owner`'s state for the loaded model (made by `make()` on first use; dropped with the model)."""
        if owner not in self.slots:
            self.slots[owner] = make()
        return self.slots[owner]

    def on_forward(self, restore) -> None:
        """Before the next plain forward, call `restore()` (e.g. a stage placement puts the model back whole)."""
        self._restore = restore

    def forward(self, message: Forward) -> Computed:
        import torch

        from .models import forward_for_family

        module, family = self.model(message.fingerprint)
        if self._restore is not None:
            self._restore()
        started = time.perf_counter()
        with torch.inference_mode():
            out = forward_for_family(family)(module, message.call.to(self.device))
        synchronize(self.device)
        return Computed(out, time.perf_counter() - started)

    def ping(self, message: Ping = None) -> dict:
        return {"pid": os.getpid()}


def run_setup(state: WorkerState, message: RunSetup) -> dict:
    """Loads a host-provided python file by path (no package name to collide with) and calls function(argument)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tandem_worker_setup_{abs(hash(message.path))}", message.path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    getattr(module, message.function)(message.argument)
    return {}


HANDLERS = {Load: WorkerState.load, Unload: WorkerState.unload, Forward: WorkerState.forward,
            Ping: WorkerState.ping, RunSetup: run_setup}


def serve(channel, state: WorkerState) -> None:
    """Answers requests, one handler per message type, until told to shut down or the host's end closes."""
    from . import strategies
    from .transport import ChannelClosed

    handlers = {**HANDLERS, **strategies.worker_handlers()}
    while True:
        try:
            request = channel.recv()
        except ChannelClosed:
            return
        if isinstance(request, Shutdown):
            channel.send(Reply())
            return
        started = time.perf_counter()
        try:
            handler = handlers.get(type(request))
            if handler is None:
                raise TypeError(f"unknown request {type(request).__name__}")
            if not isinstance(request, Ping):  # a ping reports the last request's peak
                reset_peak_memory(state.device)
            value = handler(state, request)
            reply = Reply(value=value, seconds=time.perf_counter() - started, peak_bytes=peak_memory_bytes(state.device))
        except Exception as exc:  # reported to the host, which names this worker and the call
            reply = Reply(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(),
                          seconds=time.perf_counter() - started)
        channel.send(reply)


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.host_pid:
        threading.Thread(target=_watch_host, args=(args.host_pid,), daemon=True).start()
    if args.cpus:
        pin_to_cores(int(c) for c in args.cpus.split(","))
    authkey = bytes.fromhex(os.environ.pop("TANDEM_AUTHKEY", ""))
    if not authkey:
        print("parallel_backend.worker: TANDEM_AUTHKEY is not set; workers are started by a WorkerPool",
              file=sys.stderr)
        return 2

    import torch

    from . import primitives
    from .transport import connect

    if args.threads:
        torch.set_num_threads(args.threads)
    host, port = args.connect.rsplit(":", 1)
    channel = connect((host, int(port)), authkey, f"host (worker {args.rank})")
    channel.send(Hello(args.rank, os.getpid()))
    try:
        primitives.join_group(args.rendezvous, args.rank, args.world, args.device, args.pg_timeout)
        channel.send(Reply())
    except Exception as exc:
        channel.send(Reply(ok=False, error=f"joining the process group failed: {type(exc).__name__}: {exc}"))
        return 1
    try:
        serve(channel, WorkerState(args.rank, args.world, args.device))
    finally:
        primitives.leave_group()
        channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
