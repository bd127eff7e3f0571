"""A call's mesh sized by its devices' speeds (runtime/speeds.py's shares applied to the pool's work).

device_speeds given: those. Measured: on the first call of a model and shape every worker times the same one-row
call (one untimed run, then the fastest of MEASURE_REPEATS: other load only ever adds time), kept on the engine.
"""

from __future__ import annotations

from dataclasses import replace

from .. import strategies
from ..runtime.devices import split_device
from ..runtime.messages import Forward
from ..runtime.speeds import busiest, describe, sit_out, speeds_of
from ..runtime.words import counted

MEASURE_REPEATS = 5
CFG_NOTE_ABOVE = 0.20  # cfg says it cannot rebalance when its two devices differ by more than this


def measure(engine, fingerprint: str, call) -> tuple[float, ...]:
    """Every worker's seconds for one row of `call`: all workers at once, one untimed run then the fastest of
    MEASURE_REPEATS (Computed.compute_s: the worker's own compute)."""
    one = call.select(range(0, 1))
    ranks = range(engine.device_count())
    times = {rank: [] for rank in ranks}
    for repeat in range(MEASURE_REPEATS + 1):
        replies = engine.request({rank: Forward(fingerprint, one) for rank in ranks}, "measuring each device's speed")
        if repeat:
            for rank, computed in replies.items():
                times[rank].append(computed.compute_s)
    return tuple(min(times[rank]) for rank in ranks)


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


def sized_mesh(engine, mesh, config, fingerprint: str, call, planner=None):
    """`mesh` with each rank's speed (config.device_speeds: given, or measured once per model and call shape and
    kept on the engine), row groups that would slow a call down set to 0 (they sit out), and the log told once
    which device sits out and why, or that cfg cannot rebalance; `mesh` itself when the devices are equal.
    planner: auto's (plan.calibrate.AutoPlans), whose row_split_cost judges a slow device by the plan's time of
    the split; without one, or with speeds given, by the busiest device's rows over its speed."""
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
            raise ValueError(f"device_speeds gives {counted(len(wanted), 'number')} for {counted(len(devices), 'device')} "
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
        planned = None
        if one_row_s is not None and planner is not None:
            planned = planner.row_split_cost(engine, fingerprint, call, one_row_s)
        cost = planned or busiest
        judge = ("each split's time as tandem plan predicts it: compute, contention, transfers, overhead"
                 if planned is not None else "the busiest device's rows over its speed")
        for half in range(mesh.cfg):
            ranks = [r for g in range(half * mesh.batch, (half + 1) * mesh.batch) for r in mesh.ranks(g)]
            for index in sit_out(rows, [speeds[r] for r in ranks], cost):
                rank = ranks[index]
                engine.say(f"Tandem: {devices[rank]} (worker {rank}) sits out calls of {counted(rows, 'row')}: at speed "
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
