"""Mixed devices: each device's speed, the shares sized by it, and the devices that would slow a pool down.

A speed is relative: the fastest device of the pool is 1.0, one taking twice as long for the same call is 0.5.
Speeds come from the user (`ParallelConfig.device_speeds = "1,0.5"`, one positive number per device) or are
measured per pool on the first call of a model and shape (engine/sizing.py: every worker times the same one-row
call). Speeds within EQUAL_WITHIN of each other count as equal (measurement
noise must not unbalance equal cards).

What uses them: row shares (batch, and batch inside cfg) are proportional to the speeds, by largest-remainder
rounding (`weighted_sizes`); asyncdiff's stage cut is balanced by the layer profile divided by each stage's
speed (`schedule.balance`); ring's token shards are proportional to the speeds. cfg cannot rebalance: its two
branches are two equal halves. A device whose share would make the call slower than leaving it out sits out
(`sit_out`: the plan's time of the split, plan.model.row_split_seconds, from the measured one-row time and the
pool's link, contention and overhead; with speeds given, the busiest device's rows over its speed).
Pure: engine/sizing.py measures the pool and applies these to a call's mesh.
"""

from __future__ import annotations

import math
from .words import counted

MODES = ("auto", "equal", "measure")
EQUAL_WITHIN = 0.10


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
        raise ValueError(f"device_speeds gives {counted(len(speeds), 'number')} for {counted(devices, 'device')}; give one per device")
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


def speeds_of(seconds) -> tuple[float, ...]:
    return relative([1.0 / max(s, 1e-9) for s in seconds])
