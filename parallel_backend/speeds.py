"""Mixed devices: each device's speed, the shares sized by it, and the devices that would slow a pool down.

A speed is relative: the fastest device of the pool is 1.0, one taking twice as long for the same call is 0.5.
Speeds come from the user (`ParallelConfig.device_speeds = "1,0.5"`, one positive number per device) or are
measured per pool on the first call of a model and shape: every worker times the same one-row call (one untimed
run, then the fastest of MEASURE_REPEATS: other load only ever adds time). Speeds within EQUAL_WITHIN of each other count as equal (measurement
noise must not unbalance equal cards).

What uses them: row shares (batch, and batch inside cfg) are proportional to the speeds, by largest-remainder
rounding (`weighted_sizes`); asyncdiff's stage cut is balanced by the layer profile divided by each stage's
speed (`schedule.balance`); ring's token shards are proportional to the speeds. cfg cannot rebalance: its two
branches are two equal halves. A device whose share would make the call slower than leaving it out sits out
(`sit_out`: the plan's time of the split, plan.model.row_split_seconds, from the measured one-row time and the
pool's link, contention and overhead; with speeds given, the busiest device's rows over its speed).
Pure, except `measure`, which asks the pool.
"""

from __future__ import annotations

import math

MODES = ("auto", "equal", "measure")
EQUAL_WITHIN = 0.10
MEASURE_REPEATS = 5
CFG_NOTE_ABOVE = 0.20  # cfg says it cannot rebalance when its two devices differ by more than this


def parse_speeds(value, devices: int | None = None):
    """The config's device_speeds: "auto" (measured when the pool's devices differ: a test slowdown, GPUs of
    different names), "equal", "measure", or one positive number per device ("1,0.5" or a sequence) -> a tuple
    of floats. `devices`: the pool's device count, when known. Raises ValueError saying what to change."""
    if isinstance(value, str) and value.strip().lower() in MODES:
        return value.strip().lower()
    if isinstance(value, str):
        items = [s.strip() for s in value.split(",") if s.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"device_speeds must be {', '.join(MODES)} or one positive number per device such as "
                         f"'1,0.5'; got {value!r}")
    speeds = []
    for item in items:
        try:
            speed = float(item) if not isinstance(item, bool) else math.nan
        except (TypeError, ValueError):
            speed = math.nan
        if not math.isfinite(speed) or speed <= 0:
            raise ValueError(f"device_speeds {value!r}: {item!r} is not a positive number; give one positive number "
                             "per device such as '1,0.5', or 'measure'")
        speeds.append(speed)
    if not speeds:
        raise ValueError("device_speeds is empty; give one positive number per device such as '1,0.5', or 'measure'")
    if devices is not None and len(speeds) != devices:
        raise ValueError(f"device_speeds gives {len(speeds)} number(s) for {devices} device(s); give one per device")
    return relative(speeds)


def relative(speeds) -> tuple[float, ...]:
    """The speeds over the fastest (it becomes 1.0); all within EQUAL_WITHIN of the fastest: all 1.0."""
    fastest = max(speeds)
    speeds = tuple(float(s) / fastest for s in speeds)
    return tuple(1.0 for _ in speeds) if min(speeds) >= 1.0 - EQUAL_WITHIN else speeds


def weighted_sizes(total: int, weights) -> list[int]:
    """`total` rows (or tokens) split in proportion to `weights`, by largest remainder (ties: the earlier part);
    every part of positive weight gets at least one where the total allows (taken from the part with the most
    over its quota). Parts of weight 0 get none. weighted_sizes(8, [1, 0.5]) == [5, 3]."""
    weights = [max(0.0, float(w)) for w in weights]
    whole = sum(weights)
    if whole <= 0:
        raise ValueError(f"cannot split {total} by weights {weights}: no part has a positive weight")
    quotas = [total * w / whole for w in weights]
    sizes = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - sizes[i]), i))
    for i in by_remainder[:total - sum(sizes)]:
        sizes[i] += 1
    positive = [i for i, w in enumerate(weights) if w > 0]
    if total >= len(positive):
        for i in (i for i in positive if sizes[i] == 0):
            donor = max((j for j in positive if sizes[j] > 1), key=lambda j: (sizes[j] - quotas[j], -j))
            sizes[donor] -= 1
            sizes[i] += 1
    return sizes


def busiest(sizes, speeds) -> float:
    """The plan's time of a row split: the busiest device's rows over its speed (in the fastest's row-times)."""
    return max((n / s for n, s in zip(sizes, speeds) if n), default=0.0)


def sit_out(total: int, speeds, cost=busiest) -> list[int]:
    """The parts (indexes into `speeds`) that a split of `total` rows is faster without: the slowest go first,
    one at a time, while dropping one does not make the call slower (a device that does not help is left out).
    cost(sizes, speeds): a split's time (the plan's, plan.model.row_split_seconds, where the pool was measured;
    else the busiest device's rows over its speed). Never all of them."""
    kept = sorted(range(len(speeds)), key=lambda i: (-speeds[i], i))
    while len(kept) > 1:
        now = cost(weighted_sizes(total, [speeds[i] for i in kept]), [speeds[i] for i in kept])
        fewer = kept[:-1]
        without = cost(weighted_sizes(total, [speeds[i] for i in fewer]), [speeds[i] for i in fewer])
        if without > now:
            break
        kept = fewer
    return sorted(set(range(len(speeds))) - set(kept))


def describe(speeds, devices) -> str:
    return ", ".join(f"{d} (worker {r}) {s:.2f}" for r, (d, s) in enumerate(zip(devices, speeds)))


def measure(engine, fingerprint: str, call) -> tuple[float, ...]:
    """Every worker's seconds for one row of `call`: all workers at once, one untimed run then the fastest of
    MEASURE_REPEATS (Computed.compute_s: the worker's own compute)."""
    from .messages import Forward

    one = call.select(range(0, 1))
    ranks = range(engine.device_count())
    times = {rank: [] for rank in ranks}
    for repeat in range(MEASURE_REPEATS + 1):
        replies = engine.request({rank: Forward(fingerprint, one) for rank in ranks}, "measuring each device's speed")
        if repeat:
            for rank, computed in replies.items():
                times[rank].append(computed.compute_s)
    return tuple(min(times[rank]) for rank in ranks)


def speeds_of(seconds) -> tuple[float, ...]:
    return relative([1.0 / max(s, 1e-9) for s in seconds])


def pool_differs(pool) -> bool:
    """device_speeds "auto" measures only a pool whose devices differ: a test slowdown, or CUDA devices of
    different names."""
    if any(factor != 1.0 for factor in getattr(pool, "test_slowdown", {}).values()):
        return True
    cuda = [d for d in pool.devices if d.startswith("cuda")]
    if len(cuda) < 2:
        return False
    import torch

    return len({torch.cuda.get_device_name(torch.device(d)) for d in cuda}) > 1


def sized_mesh(engine, mesh, config, fingerprint: str, call):
    """`mesh` with each rank's speed (config.device_speeds: given, or measured once per model and call shape and
    kept on the engine), row groups that would slow a call down set to 0 (they sit out), and the log told once
    which device sits out and why, or that cfg cannot rebalance; `mesh` itself when the devices are equal."""
    from dataclasses import replace

    from . import strategies
    from .runtime.devices import split_device

    wanted = config.device_speeds
    if wanted == "equal" or (wanted == "auto" and not pool_differs(engine.pool)):
        return mesh
    devices = engine.pool.devices
    one_row_s = None  # the fastest device's measured seconds for one row (speeds given: not measured)
    if isinstance(wanted, tuple) and engine.pool.left_out:  # a machine away: the speeds of the devices left
        wanted = tuple(speed for speed, device in zip(wanted, engine.pool.requested_devices)
                       if split_device(device)[0] not in engine.pool.left_out)
    if isinstance(wanted, tuple):
        if len(wanted) != len(devices):
            raise ValueError(f"device_speeds gives {len(wanted)} number(s) for {len(devices)} device(s) "
                             f"({', '.join(devices)}); give one per device")
        speeds = wanted
    else:
        key = (fingerprint, tuple(call.x.shape[1:]), str(call.x.dtype),
               None if call.context is None else tuple(call.context.shape[1:]))
        known = engine.state("device speeds")
        if key not in known:
            known[key] = measure(engine, fingerprint, call)
            engine.say(f"Tandem: measured device speeds (fastest = 1): {describe(speeds_of(known[key]), devices)}")
        speeds, one_row_s = speeds_of(known[key]), min(known[key])
    if min(speeds[:mesh.size]) == 1.0:
        return mesh
    speeds = list(speeds)
    if not strategies.get(mesh.strategy).axes and mesh.batch > 1:
        rows = call.rows // mesh.cfg
        cost = busiest if one_row_s is None else _plan_cost(engine, fingerprint, call, one_row_s)
        judge = ("each split's time as tandem plan predicts it: compute, contention, transfers, overhead"
                 if one_row_s is not None else "the busiest device's rows over its speed")
        for half in range(mesh.cfg):
            ranks = [r for g in range(half * mesh.batch, (half + 1) * mesh.batch) for r in mesh.ranks(g)]
            for index in sit_out(rows, [speeds[r] for r in ranks], cost):
                rank = ranks[index]
                engine.say(f"Tandem: {devices[rank]} (worker {rank}) sits out calls of {rows} row(s): at speed "
                           f"{speeds[rank]:.2f} of the fastest, its share would make the call slower than the "
                           f"other devices take without it ({judge})")
                speeds[rank] = 0.0
    if mesh.cfg == 2:
        halves = [sum(speeds[r] for g in range(h * mesh.batch, (h + 1) * mesh.batch) for r in mesh.ranks(g))
                  for h in range(2)]
        if min(halves) < (1.0 - CFG_NOTE_ABOVE) * max(halves):
            engine.say(f"Tandem: cfg cannot rebalance its two branches (two equal halves) over devices of speeds "
                       f"{' and '.join(f'{h:.2f}' for h in halves)}: the slower half sets the pace")
    return replace(mesh, speeds=tuple(speeds))


def _plan_cost(engine, fingerprint: str, call, one_row_s: float):
    """The plan's time of a row split (plan.model.row_split_seconds) for `call`: the fastest device's measured
    one-row seconds, the pool's link, contention and overhead (measured once per pool and model, plan/probe.py)."""
    from .plan.calibrate import tensor_bytes
    from .plan.model import Inputs, row_split_seconds
    from .plan.traffic import CallShape

    figures = engine.auto.device_figures(engine, fingerprint, call)
    if figures.link is None:
        return busiest
    rows = max(1, call.rows)
    shape = CallShape(rows, tensor_bytes([call.x, call.t, call.context, call.extras]) // rows,
                      tensor_bytes([call.x]) // rows)
    inputs = figures.apply(Inputs(shape, "", 1, {1: one_row_s}, figures.link))
    return lambda sizes, speeds: row_split_seconds(inputs, sizes, speeds)
