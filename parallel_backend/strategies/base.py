"""The interface every strategy implements, and the row split that the exact strategies share.

A strategy is one object, registered by name in `strategies/__init__.py`:
- host side: `plan(engine, call, mesh, config, fingerprint) -> {rank: message}` turns one model call into per-rank
  work; `gather(call, mesh, replies) -> output` joins the replies (each reply's value is a `Computed`);
- worker side: `worker_handlers()` maps its message types to the functions a worker runs for them (row
  strategies need none: they send the worker's plain `Forward`);
- it says whether it is exact, which mesh axes it adds inside each row group (none: rows only), how many
  branches it splits by default, what it is measured on in `tandem bench`, and explains itself;
- it declares its knobs (`knobs`: runtime/knobs.py `Knob`s, one per axis degree and per setting it reads from
  the config); the CLI, the Settings node, the demo and the config's checks are built from them.
Nothing outside `strategies/` compares strategy names: hosts ask the registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ..runtime.knobs import Knob
from ..runtime.messages import Computed, Forward


@dataclass(frozen=True)
class BenchJob:
    """What `tandem bench` measures a strategy on: images per call, with guidance or not."""

    images: int
    guided: bool


class Strategy:
    name: str = ""
    exact: bool = True
    summary: str = ""  # one sentence for help texts and tooltips
    axes: tuple[str, ...] = ()  # the mesh axes it adds inside each row group, outer to inner (each axis' degree is
    # the config field of that name)
    default_cfg_degree: int = 1  # 2: splits the branches unless told otherwise
    bench_job: BenchJob = BenchJob(1, True)
    collective: bool = False  # its workers exchange data with each other during a call
    min_warmup: int = 0  # the fewest exact warm-up steps (config.warmup) it needs on more than one stage
    adapters: tuple[str, ...] | None = None  # the model adapters it can cut (models.ADAPTERS); None: any model
    scope: str = ""  # what it splits, for the refusal of other models ("cuts UNets only")
    splits_tokens: bool = False  # it splits a call's token sequence (its attentions run through the group)
    patches_tokens: bool = False  # it runs a call's tokens in patches by position (pipefusion): a call a split by
    # tokens cannot take is refused, one with a model patch runs on whole rows, as for splits_tokens
    auto: bool = True  # auto may choose it (tandem plan lists every strategy with a cost either way)
    stage_weights: bool = False  # each device runs its own layers (stages): no sharded gather across devices
    cuts_layers: bool = False  # each device runs a share of every layer: a call with a model patch runs whole rows
    knobs: tuple[Knob, ...] = ()  # its settings (config.<name>): one per axis, then the ones it reads

    def check_family(self, family: str) -> None:
        """Raises ValueError in one sentence when this strategy cannot split a model of `family`."""
        from ..models import adapter_name

        if self.adapters is not None and adapter_name(family) not in self.adapters:
            noun = "UNet" if adapter_name(family).endswith("_unet") else f"{family.split(':', 1)[-1]} transformer"
            raise ValueError(f"strategy {self.name!r} {self.scope}, and this model is a {noun}: use cfg, batch or "
                             "auto for it")

    def check_weights(self, module, family: str) -> None:
        """Raises ValueError in one sentence when this strategy cannot handle `module`'s weights (a cut of
        quantized ones, say); before any weights travel."""

    def check_model(self, mesh, sequence) -> None:
        """Raises ValueError in one sentence when `mesh` cannot split the model that `sequence` (a
        mesh.SequenceHint, None for a model without a sequence split) describes; before any work."""

    def check_call(self, mesh, module, family: str, call) -> None:
        """Raises ValueError in one sentence when `mesh` cannot split this call of `module` (its latent's shape,
        say); on the host, before any weights travel."""

    def fill_degrees(self, given: tuple, devices: int, sequence) -> tuple[int, ...]:
        """The degree of each of its `axes`: as `given` (one per axis, None: not given); one not given takes the
        `devices` of a row group over the product of the given ones. `sequence`: the model's mesh.SequenceHint
        (None: none, or not known yet), for a strategy whose degrees depend on the model."""
        rest = math.prod(degree for degree in given if degree is not None)
        return tuple(degree if degree is not None else max(1, devices // rest) for degree in given)

    def plan(self, engine, call, mesh, config, fingerprint: str) -> dict[int, Any]:
        raise NotImplementedError

    def gather(self, call, mesh, replies: dict[int, Any]):
        raise NotImplementedError

    def worker_handlers(self) -> dict[type, Callable]:
        return {}

    def explain(self, mesh, config, steps: int, devices: list[str]) -> str:
        exact = "exact, no stale data" if self.exact else "approximate"
        return f"{self.name}: {self.summary} Mesh {mesh.describe()} on {', '.join(devices)}; {exact}."

    def weights_layout(self, mesh):
        """How the workers hold the model's weights for `mesh`: None, whole; else {rank: cut}, the cut (this
        strategy's name, the ranks that run every call of the cut model together, this rank's index among them,
        ...) each rank's worker makes as the model loads, before the weights move
        to its device (`cut_on_load`). The engine keeps a cut model under a fingerprint of its own beside the
        whole one (engine/pool_engine.py `_fingerprint_as`)."""
        return None

    cut_on_load = None  # with weights_layout: (worker state, module, family, cut) -> the cut module, on the CPU
    # with cut_on_load: (module, family, cut, held) -> {parameter path: tensor_parts part} the cut keeps, read off
    # the module's names and shapes (no weight read), for a worker to read only those (engine/weights.py `reads`)
    reads_on_load = None

    def bench_part(self, model, call, mesh):
        """For `tandem bench`'s ideal: a function that runs, on one device, what the busiest rank computes for
        `call` (one row group's rows) with the communication stubbed out; None: the ideal is the whole call over
        its largest row share."""
        return None

    def bench_figures(self, executor, loop, row: dict) -> dict:
        """Extra figures for the bench's row of this strategy (e.g. traffic between devices)."""
        return {}


def split_rows(rows: range, degree: int, weights=None) -> list[range]:
    """Near-equal contiguous shares of `rows`, in order (some empty when there are fewer rows than shares); with
    `weights` (one per share, e.g. device speeds), shares in proportion to them (speeds.weighted_sizes)."""
    from ..runtime.primitives import chunk_sizes  # torch: imported where rows are split, not with the registry
    from ..runtime.speeds import weighted_sizes

    parts, start = [], rows.start
    for size in chunk_sizes(len(rows), degree) if weights is None else weighted_sizes(len(rows), weights):
        parts.append(range(start, start + size))
        start += size
    return parts


class RowStrategy(Strategy):
    """Each rank runs the whole model on its share of the call's rows; the host concatenates the outputs."""

    def partition(self, rows: range, degree: int, branches: int, weights=None) -> list[range]:
        return split_rows(rows, degree, weights)

    def plan(self, engine, call, mesh, config, fingerprint: str) -> dict[int, Forward]:
        shares = mesh.row_shares(call.rows, call.branches)
        return {rank: Forward(fingerprint, call.select(rows)) for rank, rows in enumerate(shares) if len(rows)}

    def gather(self, call, mesh, replies: dict[int, Computed]):
        return join_rows([replies[rank].out for rank in sorted(replies)], call.x)


def join_rows(outs: list, like):
    """The per-share outputs joined along the rows, on `like`'s device and dtype; a model that returns a list or
    tuple of tensors (one per latent, e.g. video and audio) gets each joined in place."""
    import torch

    if isinstance(outs[0], (list, tuple)):
        return type(outs[0])(join_rows([out[i] for out in outs], like) for i in range(len(outs[0])))
    return torch.cat(outs).to(like.device, like.dtype)
