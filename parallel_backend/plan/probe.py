"""The cost model's device inputs, measured on the pool's own workers: the link between two of them and how much
slower each computes when all compute at once (shared cores, memory bandwidth, clocks), before any strategy runs.

- link: ranks 0 and 1 swap a small and a large buffer at once (each direction carries the buffer, as every
  strategy's exchanges do), fastest of `repeats` swaps in each of BURSTS requests; latency = the small swap,
  bandwidth = the extra bytes over the extra time. Between CPU workers that is gloo over loopback; between
  GPUs, NCCL over whatever joins them.
- contention: a one-row model call on each rank alone, then on every rank at once, in rounds; per round, the
  slowest rank's compute among all over its own alone (a step waits for its slowest rank; 1.0 where the devices
  share nothing that slows them), the median of the rounds; again for a call of the job's rows where a device
  may compute them all (a larger working set can contend more);
- overhead: the host's wall time for the lone call less the worker's compute (the pool's cost per call).
Neither runs the strategies the plan predicts, so a prediction made from them is not fitted to the run it
predicts.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

from ..runtime.messages import Forward
from ..engine.oracle import sample_call
from ..strategies.sequence.probe import ProbeExchange
from .links import Link

SMALL_BYTES = 4
LARGE_BYTES = 16 * 2**20
BURSTS = 3  # the link's swaps go in this many requests, the fastest swap of all kept


def measure_link(engine, repeats: int = 5) -> Link | None:
    """The link between ranks 0 and 1 of the engine's pool, measured (None for a pool of one device)."""
    if engine.device_count() < 2:
        return None
    seconds = {SMALL_BYTES: float("inf"), LARGE_BYTES: float("inf")}
    for _ in range(BURSTS):  # bursts apart in time: a disturbance that lasts through one burst misses another
        for nbytes in seconds:
            work = {rank: ProbeExchange((0, 1), rank, 1, nbytes, repeats + 1) for rank in (0, 1)}
            replies = engine.request(work, "timing the link between two devices", collective=True)
            seconds[nbytes] = min(seconds[nbytes], max(reply["transfer_seconds"] for reply in replies.values()))
    latency = seconds[SMALL_BYTES]
    extra = seconds[LARGE_BYTES] - latency
    bandwidth = (LARGE_BYTES - SMALL_BYTES) / extra if extra > 0 else LARGE_BYTES / seconds[LARGE_BYTES]
    devices = engine.pool.devices
    return Link(f"measured {devices[0]}<->{devices[1]}", bandwidth, latency,
                f"measured on this pool: {devices[0]} and {devices[1]} swapping {LARGE_BYTES // 2**20} MiB each way "
                f"in {1000 * seconds[LARGE_BYTES]:.1f} ms ({bandwidth / 1e9:.2f} GB/s per direction), "
                f"{SMALL_BYTES} bytes in {1e6 * latency:.0f} us; fastest of {BURSTS} x {repeats}")


def measure_calls(engine, fingerprint: str, call, repeats: int = 5, budget_s: float = 8.0,
                  most: int = 30) -> tuple[float, float]:
    """(contention, overhead): how much slower a step of `call` (of the loaded model `fingerprint`) computes
    while every device computes it too (contention_of), and the pool's own seconds per call: the host's wall
    time for rank 0's lone call less that rank's compute (messages, pickling, the inputs and the output
    crossing), median of `repeats` rounds (call_round), or more (up to `most`) while they have taken less than
    `budget_s` (quick calls are noisier: more rounds steady the medians)."""
    return contention_and_overhead(call_rounds(engine, fingerprint, {0: call}, repeats, budget_s, most)[0])


def more_rounds(done: int, repeats: int, started: float, budget_s: float, most: int) -> bool:
    """Whether to time another round: fewer than `repeats` done, or fewer than `most` while the rounds since
    `started` (perf_counter) have taken less than `budget_s`."""
    return done < max(repeats, 1) or (time.perf_counter() - started < budget_s and done < most)


def call_rounds(engine, fingerprint: str, calls: dict, repeats: int = 5, budget_s: float = 8.0,
                most: int = 30) -> dict:
    """{key: [call_round of calls[key]]}: after one warm-up round of each, rounds of every call in turn (as
    more_rounds says)."""
    for call in calls.values():
        call_round(engine, fingerprint, call)
    rounds = {key: [] for key in calls}
    started = time.perf_counter()
    while more_rounds(len(next(iter(rounds.values()))), repeats, started, budget_s, most):
        for key, call in calls.items():
            rounds[key].append(call_round(engine, fingerprint, call))
    return rounds


def call_round(engine, fingerprint: str, call) -> tuple[dict, dict, float]:
    """One round of `call` on the pool: each rank alone in turn, then every rank at once: ({rank: compute
    seconds alone}, {rank: compute seconds among all}, the host's wall time for rank 0's lone call less its
    compute). One device: nothing among all."""
    n = engine.device_count()
    alone, overhead = {}, 0.0
    for rank in range(n):
        started = time.perf_counter()
        computed = engine.request({rank: Forward(fingerprint, call)}, "timing one device alone")[rank]
        if rank == 0:
            overhead = time.perf_counter() - started - computed.compute_s
        alone[rank] = computed.compute_s
    together = {}
    if n > 1:
        replies = engine.request({rank: Forward(fingerprint, call) for rank in range(n)}, "timing every device at once")
        together = {rank: reply.compute_s for rank, reply in replies.items()}
    return alone, together, overhead


def contention_and_overhead(rounds: list) -> tuple[float, float]:
    """(contention_of the rounds, the median overhead) of call_round's rounds."""
    contention = contention_of([(alone, together) for alone, together, _ in rounds if together])
    return contention, max(0.0, statistics.median(overhead for _, _, overhead in rounds))


def contention_of(rounds: list) -> float:
    """rounds: [({rank: compute seconds alone}, {rank: compute seconds with every rank at once})], each round's
    calls made one after the other. Each rank's time among all is taken against its own alone in the same round
    (a slower device is not contention, speeds.py sizes shares by speed; a drift of the machine's speed hits
    both alike), and a call of all waits for its slowest rank, so a round counts its largest ratio; the median
    of the rounds, at least 1."""
    if not rounds:
        return 1.0
    return max(1.0, statistics.median(max(t / alone[rank] for rank, t in together.items())
                                      for alone, together in rounds))


@dataclass(frozen=True)
class DeviceFigures:
    """What plan/probe.py measured on a pool: the link (None for one device), the contention of one-row calls,
    the per-call overhead (seconds), and the contention of larger calls where measured."""

    link: Link | None
    contention: float = 1.0
    overhead_s: float = 0.0
    contention_by_rows: tuple = ()  # ((rows, factor), ...) for calls of more than one row, where measured

    def apply(self, inputs):
        """`inputs` (model.Inputs) with these figures in place of assumed ones."""
        return replace(inputs, link=self.link or inputs.link, contention=self.contention,
                       contention_by_rows=self.contention_by_rows, host_overhead_s=self.overhead_s)


def device_figures(engine, model, resolution: tuple[int, int], rows: int = 1) -> DeviceFigures:
    """The engine's pool measured for a bench model at `resolution` (its weights shipped once); the contention
    for one-row calls, and for calls of `rows` rows too where that is more."""
    link = measure_link(engine)
    fingerprint = engine.load(model.module, model.family)
    contention, overhead = measure_calls(engine, fingerprint, sample_call(model, 1, resolution))
    larger = ((rows, measure_calls(engine, fingerprint, sample_call(model, rows, resolution))[0]),) if rows > 1 else ()
    return DeviceFigures(link, contention, overhead, larger)


def probe_devices(devices, model, resolution: tuple[int, int], rows: int = 1, **pool_options) -> DeviceFigures:
    """`device_figures` on a pool started on `devices` for the purpose and stopped after; `pool_options`: more
    WorkerPool arguments (e.g. secret_file and interface for devices of other machines)."""
    from ..engine.pool_engine import engine_for
    from ..runtime.pool import WorkerPool

    with WorkerPool(devices, **pool_options) as pool:
        return device_figures(engine_for(pool), model, resolution, rows)
