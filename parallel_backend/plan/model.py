"""The cost model: predicted time per call of each strategy and mesh on N devices, and the speed-up over one
device. Pure: every input is given (measured or counted elsewhere, plan/measure.py); nothing is timed here.

time per call = the busiest device's compute (stretched by `contention` while every device computes) + the exchange it cannot hide (plan/costs.py, per strategy) +
the host's transfers to and from the devices (exposed) + the host's per-call overhead.
A whole run adds what no split shares (Amdahl): `serial_seconds` (text encoder, VAE) once, and warm-up calls at
their own cost (asyncdiff: the stages in turn); and the VAE decode, on one device against in bands on the pool
(`decode_seconds`, `decode_split_seconds`). The one-device reference is the whole call, in process.
Work a sequence split repeats on every rank (Wan's text keys and values for cross-attention) counts where a
rank's compute was measured (`shard_seconds`). Not modelled yet: asyncdiff's stride 2, devices sharing one link
(a PCIe uplink), compute slowed by a concurrent transfer (beyond the contention measured with every device
computing).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

from .. import strategies
from ..engine.mesh import Mesh, SequenceHint
from .costs import cost_for, sharded_cost, streamed_stage_cost
from .links import Link
from .traffic import CallShape, host_traffic
from ..runtime.words import counted


@dataclass(frozen=True)
class Inputs:
    """What the model predicts from. call_seconds: {rows: one device's seconds for a call of that many rows}
    (at least the whole call's rows); attention_seconds: one token-mixing attention of one row over the whole
    sequence on one device; layer_seconds: the layer profile (asyncdiff; only the shares count);
    weight_bytes: the model's weights; layer_weight_bytes: each layer's own (a stage holds its layers' and the
    rest); layer_movable_bytes: the part of each that pipefusion may put on another stage (its modulation);
    activation_bytes_per_row: a call's activations per row; host_overhead_s: per call, a pool's own cost;
    steps, warmup (exact steps of stale strategies), serial_seconds: the run around the calls; contention: how
    much slower a device computes one row while every device computes (plan/probe.py; 1.0: not at all);
    contention_by_rows: ((rows, factor), ...) the same measured for calls of more rows (a larger working set
    contends more for shared caches and memory bandwidth); shard_seconds: {(ulysses, ring): one device's time for
    what one rank of a sequence group of that split computes for one row, its exchanges stubbed out (the
    per-token layers of its tokens, its share of each attention, and the work every rank repeats)}; without
    it a rank's compute is the call's over the group's size. unit_bytes: the bytes of each unit sharded weights
    gather (models/weight_shards.py units_of; none: no sharded candidates); gathers_overlap: the next unit's
    gather hides behind the compute (CUDA); overlaps_all_to_all: the Ulysses all-to-alls hide behind the
    attention blocks computed meanwhile (plan/costs.py; False: all of them exposed); fixed_seconds: the part of
    every call's time that no split divides (a per-step cost each device pays whole, plan/fitted.py), within
    call_seconds and shard_seconds; launch_seconds: the host's time to launch one call's kernels, issued ahead of
    the device, so a floor under its compute (within call_seconds and shard_seconds above fixed_seconds: a call
    takes max(its compute, launch_seconds) + fixed_seconds); a split of the work launches every kernel still.
    decode_seconds: the run's VAE decode on one device; decode_split_seconds: the same decode in bands of rows on
    the pool's devices (plan/vae_costs.py; 0: not split), both end to end only.
    stage_cap_bytes: the memory per device the user gave, within which pipefusion cuts its stages' weights (None:
    the default share of strategies/pipefusion/cut.py, as the strategy cuts without one)."""

    shape: CallShape
    family: str
    branches: int
    call_seconds: dict
    link: Link
    attention_seconds: float = 0.0
    layer_seconds: tuple = ()
    weight_bytes: int = 0
    layer_weight_bytes: tuple = ()
    activation_bytes_per_row: int = 0
    host_overhead_s: float = 0.0
    steps: int = 20
    warmup: int = 1
    serial_seconds: float = 0.0
    contention: float = 1.0
    contention_by_rows: tuple = ()
    shard_seconds: dict = field(default_factory=dict)
    unit_bytes: tuple = ()
    gathers_overlap: bool = False
    overlaps_all_to_all: bool = True
    fixed_seconds: float = 0.0
    launch_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_split_seconds: float = 0.0
    stage_cap_bytes: int | None = None  # the memory per device given: pipefusion cuts, asyncdiff streams within it
    layer_movable_bytes: tuple = ()  # the part of each layer's weights any stage may hold (a DiT block's modulation)

    def part(self, rows: int, share: float) -> float:
        """A device's time for `share` of a `rows`-row call's work: the call's compute (its time less its fixed part)
        times the share, no less than the launches (every device launches every kernel), plus the fixed part whole
        (every device pays it)."""
        return max((self.seconds(rows) - self.fixed_seconds) * share, self.launch_seconds) + self.fixed_seconds

    def contention_at(self, rows: int) -> float:
        """The contention for calls of `rows` rows per device: linear between the measured row counts, the
        nearest measured one beyond them."""
        known = sorted({1: self.contention, **dict(self.contention_by_rows)}.items())
        return _between(known, rows, lambda r, f: f)

    def shard(self, rows: int, ulysses: int, ring: int) -> float:
        """One rank's compute for `rows` rows in a sequence group of ulysses x ring ranks."""
        one_row = self.shard_seconds.get((ulysses, ring))
        if one_row is None:
            return self.part(rows, 1 / (ulysses * ring))
        return one_row * self.seconds(rows) / self.seconds(1)

    def seconds(self, rows: int) -> float:
        """One device's time for `rows` rows: linear between the measured row counts, proportional beyond."""
        if rows <= 0:
            return 0.0
        return _between(sorted(self.call_seconds.items()), rows, lambda r, t: t * rows / r)

    @property
    def one_device(self) -> float:
        return self.seconds(self.shape.rows)


def _between(known: list, rows: int, beyond) -> float:
    """A figure for `rows` from (rows, figure) pairs sorted by rows: linear between two of them, beyond(r, f) of
    the nearest outside them."""
    for (r0, f0), (r1, f1) in zip(known, known[1:]):
        if r0 <= rows <= r1:
            return f0 + (f1 - f0) * (rows - r0) / (r1 - r0)
    return beyond(*(known[0] if rows < known[0][0] else known[-1]))


@dataclass(frozen=True)
class Candidate:
    """A strategy on a mesh, predicted. mesh: its degrees ({} for one device)."""

    strategy: str
    mesh: dict
    devices: int
    predicted_speedup: float
    predicted_speedup_end_to_end: float
    seconds_per_call: float
    exact: bool
    memory_bytes_per_device: int
    peer_bytes_per_call: int = 0
    host_bytes_per_call: int = 0
    exposed_seconds: float = 0.0
    transfer_seconds: float = 0.0
    reason: str = ""
    extra: dict = field(default_factory=dict, compare=False)
    weights: str = "replicated"  # or "sharded" (engine/weights.py)
    fits: bool | None = None  # within the memory per device given to `candidates` (None: none given)
    weights_bytes_per_device: int = 0  # of memory_bytes_per_device: the weights a device keeps
    gathered_bytes_per_device: int = 0  # and the blocks sharded weights gather at once (the rest: activations)
    decode_seconds: float = 0.0  # the VAE decode its end to end counts: whole on one device, else on the pool
    decode_seconds_whole: float = 0.0  # the same decode on one device (Inputs.decode_seconds)

    def label(self) -> str:
        if not self.mesh:
            return "one device"
        sharded = ", sharded" if self.weights == "sharded" else ""
        return f"{self.strategy} ({' x '.join(f'{k} {v}' for k, v in self.mesh.items())}{sharded})"

    def as_json(self) -> dict:
        return {"strategy": self.strategy, "mesh": dict(self.mesh), "devices": self.devices,
                "predicted_speedup": self.predicted_speedup,
                "predicted_speedup_end_to_end": self.predicted_speedup_end_to_end,
                "predicted_seconds_per_call": self.seconds_per_call,
                "seconds_per_step": self.seconds_per_call,  # one call per step: the guidance branches go in one
                "exact": self.exact,
                "memory_bytes_per_device": self.memory_bytes_per_device, "peer_bytes_per_call": self.peer_bytes_per_call,
                "host_bytes_per_call": self.host_bytes_per_call, "exposed_seconds_per_call": self.exposed_seconds,
                "transfer_seconds_per_call": self.transfer_seconds, "reason": self.reason, "weights": self.weights,
                "gib_per_device": self.memory_bytes_per_device / 2**30, "fits": self.fits,
                "decode_seconds": self.decode_seconds, "decode_seconds_whole": self.decode_seconds_whole}


def one_device(inp: Inputs) -> Candidate:
    memory = inp.weight_bytes + inp.shape.rows * inp.activation_bytes_per_row
    return Candidate("serial", {}, 1, 1.0, 1.0, inp.one_device, True, memory,
                     reason=f"the whole call on one device: {1000 * inp.one_device:.1f} ms",
                     weights_bytes_per_device=inp.weight_bytes, decode_seconds=inp.decode_seconds,
                     decode_seconds_whole=inp.decode_seconds)


def predict(inp: Inputs, mesh: Mesh, weights: str = "replicated") -> Candidate:
    """The candidate `mesh` gives (ValueError where the mesh cannot run this model, e.g. more stages than layers);
    weights "sharded": over every device of the pool (engine/weights.py)."""
    strategy = strategies.get(mesh.strategy)
    staged = strategy.axes == ("stages",)  # asyncdiff: sharded, its stages stream what exceeds the cap
    cost = streamed_stage_cost(inp, mesh) if staged and weights == "sharded" else cost_for(strategy)(inp, mesh)
    if weights == "sharded" and not staged:
        cost = sharded_cost(cost, inp, mesh.devices)
    host = host_traffic(mesh, inp.shape, inp.branches)
    groups = sum(1 for share in mesh.row_shares(inp.shape.rows, inp.branches) if len(share))
    host_s = inp.link.seconds(host.host_in, groups * mesh.inner) + inp.link.seconds(host.host_out, groups)
    slowed = (inp.contention_at(cost.rows) - 1.0) * cost.compute  # every device of the mesh computes at once
    call = cost.busy + slowed + host_s + inp.host_overhead_s
    warm = (cost.warm if cost.warm is not None else cost.busy) + host_s + inp.host_overhead_s
    stale = not strategies.get(mesh.strategy).exact
    warm_calls = min(inp.steps, inp.warmup) if stale else 0
    one = inp.one_device
    decode = inp.decode_split_seconds or inp.decode_seconds
    whole_run = inp.serial_seconds + inp.decode_seconds + inp.steps * one
    split_run = inp.serial_seconds + decode + warm_calls * warm + (inp.steps - warm_calls) * call
    reason = (f"{1000 * (cost.compute + slowed):.1f} ms compute on the busiest device + {1000 * cost.exposed:.1f} ms of "
              f"{1000 * cost.transfer:.1f} ms exchange not hidden ({cost.traffic.peer / 2**20:.2f} MiB between "
              f"devices) + {1000 * host_s:.1f} ms host transfers ({(host.host_in + host.host_out) / 2**20:.2f} MiB)"
              + (f" + {1000 * inp.host_overhead_s:.1f} ms overhead" if inp.host_overhead_s else "")
              + (f"; stale after {counted(inp.warmup, 'exact step')}" if stale else "")
              + (f"; {cost.note}" if cost.note else ""))
    if weights == "sharded" and not staged:
        reason += f"; weights sharded over {mesh.devices} devices, each block gathered before it runs"
    return Candidate(mesh.strategy, mesh.degrees(), mesh.size, one / call, whole_run / split_run, call, not stale,
                     cost.memory, cost.traffic.peer, host.host_in + host.host_out, cost.exposed + host_s,
                     cost.transfer + host_s, reason, weights=weights, weights_bytes_per_device=cost.kept,
                     gathered_bytes_per_device=cost.gathered, decode_seconds=decode,
                     decode_seconds_whole=inp.decode_seconds)


def row_split_seconds(inp: Inputs, sizes, speeds) -> float:
    """One call whose rows are split `sizes` over devices of relative `speeds` (the device `inp` was measured on
    is 1.0): the busiest device's compute (stretched by the contention where more than one computes) + the
    host's transfers of the rows to and from the devices that compute + the per-call overhead. What decides
    whether a slow device is worth its share (speeds.sit_out)."""
    parts = [(n, speed) for n, speed in zip(sizes, speeds) if n]
    crowded = len(parts) > 1
    compute = max(inp.seconds(n) / speed * (inp.contention_at(n) if crowded else 1.0) for n, speed in parts)
    rows = sum(n for n, _ in parts)
    host = (inp.link.seconds(rows * inp.shape.input_bytes, len(parts))
            + inp.link.seconds(rows * inp.shape.output_bytes, len(parts)))
    return compute + host + inp.host_overhead_s


def meshes(inp: Inputs, devices: int) -> list[Mesh]:
    """Every mesh of 2 to `devices` devices that the strategies with a cost can run this model on: cfg only with
    two branches, no more row groups than rows or devices, inner degrees of 2 or more that the model accepts."""
    hint = SequenceHint(inp.shape.heads or None)
    out = []
    for name in strategies.names():
        strategy = strategies.get(name)
        if cost_for(strategy) is None or _refuses(strategy.check_family, inp.family):
            continue
        cfgs = [strategy.default_cfg_degree] if not strategy.axes else [1, 2]
        for cfg in cfgs:
            if cfg == 2 and inp.branches != 2:
                continue
            for batch in range(1, inp.shape.rows // cfg + 1):
                left = devices // (cfg * batch)
                for split in _splits(strategy, left):
                    mesh = Mesh(name, cfg, batch, split, devices)
                    if 2 <= mesh.size <= devices and not _refuses(strategy.check_model, mesh, hint):
                        out.append(mesh)
    return out


def _splits(strategy, left: int):
    """The degrees of `strategy`'s axes worth predicting: each from 2 within its knob's declared range, their
    product at most `left` devices."""
    knobs = {knob.name: knob for knob in strategy.knobs}
    ranges = [range(max(2, int(knobs[axis].low or 2)),
                    min(left, left if knobs[axis].high is None else int(knobs[axis].high)) + 1)
              for axis in strategy.axes]
    for split in itertools.product(*ranges):
        if math.prod(split) <= left:
            yield split


def _refuses(check, *args) -> bool:
    """Whether a strategy's check (check_family, check_model) refuses these arguments."""
    try:
        check(*args)
    except ValueError:
        return True
    return False


def candidates(inp: Inputs, devices: int, budget_bytes: int | None = None) -> list[Candidate]:
    """One device and every mesh that can run, predicted, each with its weights whole and (where the strategy
    allows and `inp` knows the units) sharded; best first (ties: exact, then fewer devices). budget_bytes: the
    memory per device, which sets each candidate's `fits`."""
    out = [one_device(inp)]
    for mesh in meshes(inp, devices):
        strategy = strategies.get(mesh.strategy)
        shardable = inp.unit_bytes and not (strategy.stage_weights or strategy.cuts_layers)
        streams = strategy.axes == ("stages",) and bool(inp.layer_weight_bytes)  # asyncdiff: streamed layers
        for weights in ("replicated", "sharded") if shardable or streams else ("replicated",):
            try:
                candidate = predict(inp, mesh, weights)
            except ValueError:  # e.g. more stages than the model has layers
                continue
            if streams and weights == "sharded" and out[-1].mesh == candidate.mesh and \
                    candidate.memory_bytes_per_device >= out[-1].memory_bytes_per_device:
                continue  # every stage within the cap already: nothing streamed, the same candidate
            out.append(candidate)
    if budget_bytes is not None:
        out = [replace(c, fits=c.memory_bytes_per_device <= budget_bytes) for c in out]
    return sorted(out, key=lambda c: (-round(c.predicted_speedup, 3), not c.exact, c.devices))
