"""The mesh: how a pool's devices share one model call, and the resolver that picks it for any device count.

A mesh has three degrees, outer to inner: cfg (the [uncond; cond] branches), batch (contiguous shares of the
rows) and the inner axis of the strategy that runs each row group (asyncdiff: stages; 1 for row strategies).
Rank = (cfg_index * batch + batch_index) * inner + inner_index. Devices beyond the mesh's size sit out.

`resolve` turns a ParallelConfig, the pool's device count and one call's shape into a valid mesh:
- "auto" (exact, rule-based): cfg when the call holds two branches and there are two devices, then batch
  over the rows the call has; devices the call cannot use sit out.
- a named strategy: the degrees the config gives, the rest from the strategy's defaults. A call holding one
  branch folds the cfg degree into batch (same ranks, so a strategy's per-rank state still fits).
`check_job` refuses, before any work, a job that cannot use the mesh as configured (cfg at cfg = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import strategies


@dataclass(frozen=True)
class Mesh:
    strategy: str  # the registered strategy that runs each call on this mesh
    cfg: int = 1
    batch: int = 1
    inner: int = 1
    devices: int = 1  # the pool's device count (>= size)

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
        axis = strategies.get(self.strategy).axis
        return {"cfg": self.cfg, "batch": self.batch, **({axis: self.inner} if axis else {})}

    def row_shares(self, rows: int, branches: int) -> list[range]:
        """Rows of each row group, group order (one group per cfg x batch cell)."""
        shares = [range(rows)]
        for axis, degree in (("cfg", self.cfg), ("batch", self.batch)):
            shares = [part for share in shares for part in strategies.get(axis).partition(share, degree, branches)]
        return shares

    def ranks(self, group: int) -> range:
        return range(group * self.inner, (group + 1) * self.inner)

    def product(self) -> str:
        """The degrees as written in messages: "cfg 2 x batch 1 x stages 2"."""
        return " x ".join(f"{name} {degree}" for name, degree in self.degrees().items())

    def describe(self) -> str:
        return f"{self.strategy} ({self.product()})" + (f", {self.idle} device(s) idle" if self.idle else "")


def resolve(config, n_devices: int, branches: int = 2, rows: int | None = None) -> Mesh:
    """The mesh `config` gives a call of `branches` (1 or 2) and `rows` rows (None: as many as devices) on
    `n_devices` devices. Raises ValueError (saying what to change) when the config's degrees do not fit."""
    if n_devices < 1:
        raise ValueError("a pool needs at least one device")
    if config.strategy == "auto":
        cfg = 2 if branches == 2 and n_devices >= 2 else 1
        wanted = n_devices // cfg if rows is None else max(1, rows // cfg)
        return Mesh("batch" if cfg == 1 else "cfg", cfg, max(1, min(n_devices // cfg, wanted)), 1, n_devices)
    strategy = strategies.get(config.strategy)
    cfg = config.cfg_degree or strategy.default_cfg_degree
    if strategy.axis is None:
        batch, inner = config.batch_degree or max(1, n_devices // cfg), 1
    else:
        batch = config.batch_degree or 1
        inner = getattr(config, strategy.axis, None) or max(1, n_devices // (cfg * batch))
    mesh = Mesh(strategy.name, cfg, batch, inner, n_devices)
    if mesh.size > n_devices:
        raise ValueError(f"strategy {strategy.name!r}: {mesh.product()} = {mesh.size} devices, but there are {n_devices}; "
                         "give more devices or smaller degrees")
    if inner > 1 and config.warmup < strategy.min_warmup:
        raise ValueError(f"strategy {strategy.name!r} on {inner} stages needs warmup >= {strategy.min_warmup} (its "
                         f"later stages start from what the warm-up hands them); got {config.warmup}")
    if branches == 1 and cfg == 2:
        mesh = Mesh(strategy.name, 1, batch * 2, inner, n_devices)
    return mesh


def check_job(config, n_devices: int, guided: bool) -> Mesh:
    """The mesh of a job's calls (guided: with an uncond branch); refuses, before any work, a mesh that splits
    by branch when the job has only one."""
    mesh = resolve(config, n_devices, 2 if guided else 1)
    wants_cfg = config.strategy != "auto" and (config.cfg_degree or strategies.get(config.strategy).default_cfg_degree) == 2
    if wants_cfg and not guided:
        raise ValueError("cfg degree 2 needs cfg > 1; this job runs with cfg=1.0 (no uncond branch): use strategy "
                         "'batch' or 'auto'")
    return mesh
