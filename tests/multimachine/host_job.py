"""The host side of the two-machine tests (run inside the host's namespace): one pool over DEVICES, and per
strategy the tiny bench model's sampler loop on the pool vs one device. Prints one JSON object per line.

    host_job.py DEVICES --strategies cfg,batch,asyncdiff [--variant N] [--weights sharded] [--hold FILE]
                [--fault-steps N]

--variant N: the tiny model's weights scaled by 1 + N/100 (another model of the same size, for the weights
cache's tests). Each job's line has "shipped" (all bytes), "sent" (bytes per other machine), the pool's "devices"
and the machines it "left_out".

--hold FILE: after the jobs, keep the pool up until FILE exists (the test looks at the listening sockets and
sends them garbage), then run one more batch job: {"after_hold": max diff, "starts": pool starts}.
--fault-steps N: then run eleven jobs of N steps (N < 1000), printing {"event": "running"} first; a WorkerError is printed as
{"error": ..., "seconds": ...} and one more cfg job is tried (once the file --resume names exists, if given), its
result or error printed as {"next": "ok" or the error, "max_diff", "meshes", "devices", "shipped", "log", "seconds"}
(against one device; the meshes its calls ran on, the pool's devices then, the weights bytes shipped for it,
the "tandem" log lines since the last job). --rejoin FILE: then, once FILE exists, one more such job,
printed as {"rejoin": ...}. --later N: then N more such jobs, each printed as {"later": ...}. Each such line also has
"reference_seconds", the one-device run's time, and "probe_seconds", the time the pool spent trying machines
left out during the job (PoolStats.rejoin_seconds).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.engine.config import ParallelConfig
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.engine.oracle import job_for, run_loop
from parallel_backend.runtime.pool import WorkerError, WorkerPool

STEPS = 4


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


class LogLines(logging.Handler):
    """The "tandem" log's messages, taken out by `take` (what was logged since the last call)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        logger = logging.getLogger("tandem")
        logger.addHandler(self)
        logger.setLevel(logging.DEBUG)

    def emit(self, record) -> None:
        self.lines.append(record.getMessage())

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


def wait_for(path: str | None) -> None:
    until = time.monotonic() + 120
    while path and not Path(path).exists() and time.monotonic() < until:
        time.sleep(0.1)


def job_after_fault(key: str, model, pool, devices: str, resolution, log: LogLines) -> None:
    """One cfg job of 2 steps on the pool, vs one device; printed under `key` (module doc)."""
    job = job_for("cfg")
    started = time.monotonic()
    reference = run_loop(model, job, resolution, 2, 0).latents
    reference_s = time.monotonic() - started
    shipped, probing, started = pool.stats.weights_bytes_shipped, pool.stats.rejoin_seconds, time.monotonic()
    try:
        result = run_loop(model, job, resolution, 2, 0, executor=ParallelExecutor(pool, ParallelConfig(devices, "cfg")))
    except (WorkerError, RuntimeError, OSError) as exc:
        say(**{key: f"{type(exc).__name__}: {exc}"}, log=log.take(), seconds=time.monotonic() - started)
        return
    say(**{key: "ok"}, max_diff=(result.latents - reference).abs().max().item(),
        meshes=sorted({call["mesh"].describe() for call in result.calls}), devices=list(pool.devices),
        shipped=pool.stats.weights_bytes_shipped - shipped, log=log.take(), seconds=time.monotonic() - started,
        reference_seconds=reference_s, probe_seconds=pool.stats.rejoin_seconds - probing)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("devices")
    parser.add_argument("--strategies", default="cfg,batch,asyncdiff")
    parser.add_argument("--variant", type=int, default=0)
    parser.add_argument("--weights", default="replicated", help="replicated or sharded (ParallelConfig.weights)")
    parser.add_argument("--hold", default=None)
    parser.add_argument("--fault-steps", type=int, default=0)
    parser.add_argument("--resume", default=None, help="after the fault, wait for this file before the next job")
    parser.add_argument("--rejoin", default=None, help="then wait for this file and run one more job")
    parser.add_argument("--later", type=int, default=0, help="then run this many more jobs")
    args = parser.parse_args()
    log = LogLines()
    model = build_bench_model("tiny")
    if args.variant:
        with torch.no_grad():
            for parameter in model.module.parameters():
                parameter.mul_(1 + args.variant / 100)
    resolution = (model.default_resolution,) * 2
    pool = WorkerPool(args.devices, start_timeout_s=90, hang_floor_s=20)
    try:
        for strategy in filter(None, args.strategies.split(",")):
            # asyncdiff: its warm-up covers every step, so it must equal one device (its exact mode)
            config = ParallelConfig(args.devices, strategy, weights=args.weights,
                                    **({"warmup": STEPS} if strategy == "asyncdiff" else {}))
            job = job_for(strategy)
            reference = run_loop(model, job, resolution, STEPS, 0).latents
            started = time.perf_counter()
            result = run_loop(model, job, resolution, STEPS, 0, executor=ParallelExecutor(pool, config)).latents
            say(strategy=strategy, max_diff=(result - reference).abs().max().item(),
                seconds=time.perf_counter() - started, shipped=pool.stats.weights_bytes_shipped,
                sent=pool.stats.weights_bytes_per_machine, calls=pool.stats.calls, devices=list(pool.devices),
                left_out=sorted(pool.left_out))
        if args.hold:
            say(event="holding", pids=pool.worker_pids())
            until = time.monotonic() + 120
            while not Path(args.hold).exists() and time.monotonic() < until:
                time.sleep(0.1)
            config = ParallelConfig(args.devices, "batch")  # the pool still works after the wait (and intruders)
            reference = run_loop(model, job_for("batch"), resolution, STEPS, 0).latents
            try:
                result = run_loop(model, job_for("batch"), resolution, STEPS, 0,
                                  executor=ParallelExecutor(pool, config)).latents
                say(after_hold=(result - reference).abs().max().item(), starts=pool.stats.starts)
            except WorkerError as exc:
                say(after_hold=None, error=str(exc))
        if args.fault_steps:
            config = ParallelConfig(args.devices, "batch")
            say(event="running", pids=pool.worker_pids())
            started = time.monotonic()
            try:
                run_loop(model, job_for("batch"), resolution, args.fault_steps, 10, executor=ParallelExecutor(pool, config))
                say(error=None, seconds=time.monotonic() - started)
            except WorkerError as exc:
                say(error=str(exc), seconds=time.monotonic() - started)
            log.take()
            wait_for(args.resume)
            job_after_fault("next", model, pool, args.devices, resolution, log)
            if args.rejoin:
                wait_for(args.rejoin)
                job_after_fault("rejoin", model, pool, args.devices, resolution, log)
            for _ in range(args.later):
                job_after_fault("later", model, pool, args.devices, resolution, log)
    finally:
        pool.shutdown()
    say(event="done")


if __name__ == "__main__":
    main()
    # Everything is shut down and said (a failure above raised and exits as usual). Skip the interpreter's
    # teardown of torch and diffusers: seconds on a loaded 2-core machine, which every test waits for
    # (finish_host), and which proves nothing about the pool, whose folders and processes a test checks itself.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
