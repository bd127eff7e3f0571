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

WATCHDOG_PERIOD_S = 0.5


def _watch_host(host_pid: int) -> None:
    """Ends this process as soon as the host process is gone (killed, crashed, exited without shutdown)."""
    while True:
        time.sleep(WATCHDOG_PERIOD_S)
        try:
            os.kill(host_pid, 0)
        except ProcessLookupError:
            os._exit(3)
        except PermissionError:
            pass


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
    """What one worker holds: its device, its models by fingerprint, and the process group."""

    def __init__(self, rank: int, world: int, device: str):
        import torch

        self.rank, self.world = rank, world
        self.device = torch.device(device)
        self.models: dict[str, tuple[object, str]] = {}  # fingerprint -> (module, family)
        self.stages = None  # a StageRunner while the model runs cut into stages (asyncdiff)

    def load(self, fingerprint: str, family: str, path: str | None = None, shared: bytes | None = None) -> dict:
        import torch

        started = time.perf_counter()
        if shared is not None:
            # The host's own copy on this GPU, mapped through CUDA IPC handles: nothing is copied.
            import pickle

            import torch.multiprocessing  # noqa: F401  (registers the tensor reductions)

            module = pickle.loads(shared).eval().requires_grad_(False)
            module._tandem_shared_with_host = True  # never moved off the device (that would copy it)
        else:
            # mmap: CPU workers share the host's page-cache copy instead of each holding their own.
            module = torch.load(path, mmap=True, map_location="cpu", weights_only=False)
            module = module.to(self.device).eval().requires_grad_(False)
        self.models = {fingerprint: (module, family)}  # one model at a time: a new one releases the old
        self.stages = None
        return {"seconds": time.perf_counter() - started}

    def unload(self) -> dict:
        self.models.clear()
        self.stages = None
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        return {}

    def _model(self, fingerprint: str) -> tuple[object, str]:
        if fingerprint not in self.models:
            raise RuntimeError(f"model {fingerprint[:12]} is not loaded on this worker")
        return self.models[fingerprint]

    def call(self, fingerprint: str, call) -> object:
        import torch

        from .models import forward_for_family

        module, family = self._model(fingerprint)
        if self.stages is not None:  # back from stages: the whole model on this device again
            self.stages.place_whole()
        with torch.inference_mode():
            out = forward_for_family(family)(module, call.to(self.device))
        return out.to("cpu")

    def stage(self, fingerprint: str, action: str, payload) -> dict:
        """asyncdiff: action 'profile' (payload: a ModelCall), 'setup' (a stage plan), 'call' (a ModelCall) or
        'probe' (time a bare exchange with a peer)."""
        from .stage_runner import StageRunner

        module, family = self._model(fingerprint)
        if self.stages is None:
            self.stages = StageRunner(module, family, self.device)
        if action == "profile":
            return self.stages.profile(payload)
        if action == "setup":
            return self.stages.setup(payload)
        if action == "probe":
            return self.stages.probe(payload)
        out, timing = self.stages.call(payload)
        return {"out": None if out is None else out.to("cpu"), **timing}

    def memory(self) -> dict:
        import resource

        import torch

        if self.device.type == "cuda":
            return {"peak_bytes": torch.cuda.max_memory_allocated(self.device)}
        return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_setup(path: str, function: str, argument) -> dict:
    """Loads a host-provided python file by path (no package name to collide with) and calls function(argument)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tandem_worker_setup_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    getattr(module, function)(argument)
    return {}


def serve(channel, state: WorkerState) -> None:
    """Answers requests until told to shut down or the host's end closes."""
    from .transport import ChannelClosed

    while True:
        try:
            request = channel.recv()
        except ChannelClosed:
            return
        op = request.get("op")
        try:
            if op == "shutdown":
                channel.send({"ok": True})
                return
            if op == "call":
                started = time.perf_counter()
                out = state.call(request["fingerprint"], request["call"])
                reply = {"ok": True, "out": out, "seconds": time.perf_counter() - started, **state.memory()}
            elif op == "stage":
                started = time.perf_counter()
                result = state.stage(request["fingerprint"], request["action"], request["payload"])
                reply = {"ok": True, "seconds": time.perf_counter() - started, **result, **state.memory()}
            elif op == "load":
                reply = {"ok": True, **state.load(request["fingerprint"], request["family"], request.get("path"),
                                                  request.get("shared"))}
            elif op == "setup":
                reply = {"ok": True, **run_setup(request["path"], request["function"], request["argument"])}
            elif op == "unload":
                reply = {"ok": True, **state.unload()}
            elif op == "ping":
                reply = {"ok": True, "pid": os.getpid(), **state.memory()}
            else:
                reply = {"ok": False, "error": f"unknown request {op!r}"}
        except Exception as exc:  # reported to the host, which names this worker and the call
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        channel.send(reply)


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.host_pid:
        threading.Thread(target=_watch_host, args=(args.host_pid,), daemon=True).start()
    if args.cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
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
    channel.send({"op": "hello", "rank": args.rank, "pid": os.getpid()})
    try:
        primitives.join_group(args.rendezvous, args.rank, args.world, args.device, args.pg_timeout)
        channel.send({"ok": True, "op": "ready", "rank": args.rank})
    except Exception as exc:
        channel.send({"ok": False, "error": f"joining the process group failed: {type(exc).__name__}: {exc}"})
        return 1
    try:
        serve(channel, WorkerState(args.rank, args.world, args.device))
    finally:
        primitives.leave_group()
        channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
