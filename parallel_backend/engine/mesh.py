"""The mesh: how a pool's devices share one model call, and the resolver that picks it for any device count.

A mesh has these degrees, outer to inner: cfg (the [uncond; cond] branches), batch (contiguous shares of the
rows), then the inner axes of the strategy that runs each row group (asyncdiff: stages; ulysses; ring; usp:
ring x ulysses; none for row strategies), whose product is `inner`.
Rank = (cfg_index * batch + batch_index) * inner + inner_index. Devices beyond the mesh's size sit out.

`resolve` turns a ParallelConfig, the pool's device count and one call's shape into a valid mesh:
- "auto": the engine chooses a call's mesh with the cost model (plan/calibrate.py: the first two calls of a
  model and shape run on one device, the second measured; the plan's choice, never a split predicted under
  1.05x, runs the calls after them). `resolve` gives auto's mesh only where nothing is measured yet: `check_job`
  before a job's first call (auto never refuses a job), `--explain`, the bench's and demo's checks, and a pool
  of one device. There it is the exact rule it was before the plan: cfg when the call holds two branches and
  there are two devices; then, on the devices left, batch over the rows the call has, unless the model can
  split its token sequence (a `SequenceHint`) and the call has fewer rows per cfg group than devices left: then
  those devices split the sequence, ulysses when their number divides the model's attention heads, else ring.
- a named strategy: the degrees the config gives, the rest from the strategy's defaults. A call holding one
  branch folds the cfg degree into batch (same ranks, so a strategy's per-rank state still fits).
`check_job` refuses, before any work, a job that cannot use the mesh as configured (cfg at cfg = 1).
`fit` is the mesh of a pool that runs without a machine it could not reach: as configured where that fits the
devices left, else auto's exact rule for them.
This module knows no model: what it needs of one comes in the hint, which the engine computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .. import strategies
from ..runtime.words import counted


@dataclass(frozen=True)
class SequenceHint:
    """What the mesh needs of a model whose family can split its token sequence (models.sequence_runner): its
    attention heads (None: unknown), which a ulysses degree must divide."""

    heads: int | None = None

    def ulysses_fits(self, degree: int) -> bool:
        return self.heads is not None and self.heads % degree == 0


@dataclass(frozen=True)
class Mesh:
    strategy: str  # the registered strategy that runs each call on this mesh
    cfg: int = 1
    batch: int = 1
    split: tuple[int, ...] = ()  # the degree of each of the strategy's axes, in its order (outer to inner)
    devices: int = 1  # the pool's device count (>= size)
    why: str = field(default="", compare=False)  # auto: why it was chosen (said in the log)
    speeds: tuple[float, ...] = ()  # each rank's relative speed (runtime/speeds.py; 0: it sits out); (): all equal

    @property
    def inner(self) -> int:
        return math.prod(self.split)

    @property
    def size(self) -> int:
        return self.cfg * self.batch * self.inner

    @property
    def groups(self) -> int:
        return self.cfg * self.batch

    @property
    def idle(self) -> int:
        return self.devices - self.size

    def degrees(self) -> dict[str, int]:
        axes = strategies.get(self.strategy).axes
        return {"cfg": self.cfg, "batch": self.batch, **dict(zip(axes, self.split))}

    def row_shares(self, rows: int, branches: int) -> list[range]:
        """Rows of each row group, group order (one group per cfg x batch cell); with `speeds`, the batch shares
        of each cfg half in proportion to their groups' speeds (the sum of their ranks')."""
        halves = strategies.get("cfg").partition(range(rows), self.cfg, branches)
        return [part for i, half in enumerate(halves)
                for part in strategies.get("batch").partition(half, self.batch, branches, self.group_speeds(i))]

    def group_speeds(self, cfg_index: int) -> list[float] | None:
        """The speeds of the batch groups of one cfg half (each the sum of its ranks' speeds); None: equal."""
        if not self.speeds:
            return None
        groups = range(cfg_index * self.batch, (cfg_index + 1) * self.batch)
        return [sum(self.speeds[r] for r in self.ranks(g)) for g in groups]

    def ranks(self, group: int) -> range:
        return range(group * self.inner, (group + 1) * self.inner)

    def product(self) -> str:
        """The degrees as written in messages: "cfg 2 x batch 1 x stages 2"."""
        return " x ".join(f"{name} {degree}" for name, degree in self.degrees().items())

    def describe(self) -> str:
        return f"{self.strategy} ({self.product()})" + (f", {counted(self.idle, 'device')} idle" if self.idle else "")


def resolve(config, n_devices: int, branches: int = 2, rows: int | None = None,
            sequence: SequenceHint | None = None) -> Mesh:
    """The mesh `config` gives a call of `branches` (1 or 2) and `rows` rows (None: as many as devices) on
    `n_devices` devices, for a model that `sequence` describes (None: it cannot split its token sequence).
    Raises ValueError (saying what to change) when the config's degrees do not fit."""
    if n_devices < 1:
        raise ValueError("a pool needs at least one device")
    if config.strategy == "auto":
        return _auto(n_devices, branches, rows, sequence)
    strategy = strategies.get(config.strategy)
    cfg = config.cfg_degree or strategy.default_cfg_degree
    if not strategy.axes:
        batch, split = config.batch_degree or max(1, n_devices // cfg), ()
    else:
        batch = config.batch_degree or 1
        given = tuple(getattr(config, axis, None) for axis in strategy.axes)
        split = strategy.fill_degrees(given, max(1, n_devices // (cfg * batch)), sequence)
    mesh = Mesh(strategy.name, cfg, batch, split, n_devices)
    if mesh.size > n_devices:
        raise ValueError(f"strategy {strategy.name!r}: {mesh.product()} = {mesh.size} devices, but there are {n_devices}; "
                         "give more devices or smaller degrees")
    if mesh.inner > 1 and config.warmup < strategy.min_warmup:
        raise ValueError(f"strategy {strategy.name!r} on {mesh.inner} stages needs warmup >= {strategy.min_warmup} "
                         f"(its later stages start from what the warm-up hands them); got {config.warmup}")
    strategy.check_model(mesh, sequence)
    if branches == 1 and cfg == 2:
        mesh = Mesh(strategy.name, 1, batch * 2, split, n_devices)
    return mesh


def whole_rows(n_devices: int, branches: int = 2, rows: int | None = None) -> Mesh:
    """auto's exact mesh of whole rows (cfg, batch) for a call that must not have its tokens split."""
    return _auto(n_devices, branches, rows, None)


def fit(config, n_devices: int, branches: int = 2, rows: int | None = None,
        sequence: SequenceHint | None = None) -> Mesh:
    """The mesh on a pool that runs without some of its configured devices (another machine that cannot be
    reached, runtime/pool.py): `resolve`'s where the config's degrees fit the `n_devices` left, else auto's exact mesh
    for them (cfg 2 on one device: that device runs both branches in one call)."""
    try:
        return resolve(config, n_devices, branches, rows, sequence)
    except ValueError:
        return _auto(n_devices, branches, rows, sequence)


def _auto(n_devices: int, branches: int, rows: int | None, sequence: SequenceHint | None) -> Mesh:
    """auto's exact mesh where the plan has measured nothing (module doc)."""
    cfg = 2 if branches == 2 and n_devices >= 2 else 1
    left = n_devices // cfg
    per_group = left if rows is None else max(1, rows // cfg)
    if sequence is None or per_group >= left:
        return Mesh("batch" if cfg == 1 else "cfg", cfg, min(left, per_group), (), n_devices)
    fits = sequence.ulysses_fits(left)
    kind = "ulysses" if fits else "ring"
    heads = "the model's attention heads are unknown" if sequence.heads is None else \
        f"the model's {sequence.heads} attention heads {'divide' if fits else 'do not divide'} by {left}"
    why = (f"{counted(per_group, 'row')} per cfg group cannot give each of its {left} devices a whole row, so they split the "
           f"token sequence; {kind}: {heads}")
    return Mesh(kind, cfg, 1, (left,), n_devices, why)


def check_job(config, n_devices: int, guided: bool) -> Mesh:
    """The mesh of a job's calls (guided: with an uncond branch); refuses, before any work, a mesh that splits
    by branch when the job has only one."""
    mesh = resolve(config, n_devices, 2 if guided else 1)
    wants_cfg = config.strategy != "auto" and (config.cfg_degree or strategies.get(config.strategy).default_cfg_degree) == 2
    if wants_cfg and not guided:
        raise ValueError("cfg degree 2 needs cfg > 1; this job runs with cfg=1.0 (no uncond branch): use strategy "
                         "'batch' or 'auto'")
    return mesh


def whole_on_rank_0(devices: int, why: str = "") -> Mesh:
    """The whole call on rank 0 of a pool of `devices` (a row strategy at degree 1), the others idle."""
    return Mesh("batch", 1, 1, (), devices, why)
