"""The GPU model fitted to published measurements: its global constants (Constants; FITTED, the ones
plan/published.py fits to tests/data/published_gpu_figures.csv, recorded here) and a job's model.Inputs from
counted FLOPs under them (`job_inputs`). Pure arithmetic; nothing is timed.

What it adds to FLOPs over a GPU's peak (each constant global, none per job):
- a per-step fixed cost, `fixed_s` (host launches, synchronisation, the sampler's own work): every rank of a
  sequence or tensor split pays it whole (each launches every layer), a stage of asyncdiff its layers' share;
  with torch.compile it is `compiled_fixed` x fixed_s;
- compute efficiency as a function of the work per device: a call of f FLOPs on a GPU of peak P runs at
  peak_fraction x f / (f + half_work) of P, so it takes (f + half_work) / (P x peak_fraction);
- the Ulysses all-to-all exposed whole (model.Inputs.overlaps_all_to_all False: the peers' Ulysses, which the
  constants are fitted to, waits for it); a ring's passes still hide behind the block held (plan/costs.py);
- `split_s` per step for any split (the processes' hand-over and synchronisation: model.Inputs.host_overhead_s);
- `message_s` added to every message's latency (a launch and the host's work per exchange);
- the text encoder and VAE of a run, once and not split: `serial_flops_per_pixel` x the output's pixels (x frames)
  at peak x peak_fraction (model.Inputs.serial_seconds: the end-to-end figures);
- the links by name (plan/links.py), PCIe without peer-to-peer among them;
- the weights' bytes in the dtype asked (engine/config.py WEIGHTS_DTYPE: bf16, or fp8 at 1 byte a parameter).
A card's own figures, measured by `tandem plan --calibrate`, replace the fitted constants for it
(plan/gpu_calibration.py constants_for).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.config import WEIGHT_BYTES, WEIGHTS_DTYPE
from .links import Link
from .model import Inputs


@dataclass(frozen=True)
class Constants:
    """The fitted model's global constants (the module's docstring says what each is)."""

    fixed_s: float
    peak_fraction: float
    half_work: float  # FLOPs
    split_s: float
    message_s: float
    serial_flops_per_pixel: float
    compiled_fixed: float

    def as_tuple(self) -> tuple[float, ...]:
        return (self.fixed_s, self.peak_fraction, self.half_work, self.split_s, self.message_s,
                self.serial_flops_per_pixel, self.compiled_fixed)


# plan/published.py `fit` over the table's predictable rows (tests/test_plan_published.py refits and checks these
# figures, so a change of the table or the model shows here). A constant near 0 (split_s, compiled_fixed) ran to the
# search's floor: the table does not support it; it stays a term so that a calibration on a lent GPU can set it.
FITTED = Constants(fixed_s=0.08526229030337645, peak_fraction=0.6749294037880016, half_work=37.75134544279094,
                   split_s=1.887567272139548e-13, message_s=2.8650479686018935e-05,
                   serial_flops_per_pixel=141174963.9214767, compiled_fixed=5.380082719247674e-10)


def job_inputs(counted, peak_flops: float, link: Link, branches: int, steps: int, pixels: int, c: Constants,
               ranks: int, compiled: bool = False, overlaps_all_to_all: bool = False,
               sharded: bool = False, weights_dtype: str = "bf16") -> Inputs:
    """model.Inputs of a job from its counted figures (plan/paper.py Counted) on a GPU of `peak_flops` joined by
    `link`, under constants `c`: every call (f + half_work) / (peak x peak_fraction) plus the fixed cost; a sequence
    rank's part, for every split of up to `ranks` ranks, from its share of one row's FLOPs; the serial part of the
    run from its output's `pixels`. sharded: with the units sharded weights gather, posted ahead as on CUDA.
    weights_dtype: a WEIGHT_BYTES name; the weights' bytes (held, per layer, gathered) at that size a parameter."""
    scale = WEIGHT_BYTES[WEIGHTS_DTYPE.validate(weights_dtype)] * counted.parameters / counted.weight_bytes

    def held(nbytes) -> int:
        return round(nbytes * scale)

    rate = peak_flops * c.peak_fraction
    fixed = c.fixed_s * (c.compiled_fixed if compiled else 1.0)

    def call(flops: float) -> float:
        return (flops + c.half_work) / rate + fixed

    one = counted.flops[1]
    shard = {(u, r): call(one / (u * r)) for u in range(1, ranks + 1) for r in range(1, ranks // u + 1) if u * r > 1}
    return Inputs(counted.shape, counted.family, branches, {r: call(f) for r, f in counted.flops.items()},
                  Link(link.name, link.bandwidth, link.latency + c.message_s, link.source),
                  attention_seconds=counted.attention_flops * (one + c.half_work) / one / rate,
                  layer_seconds=tuple(f for _, f in counted.layers), weight_bytes=held(counted.weight_bytes),
                  layer_weight_bytes=tuple(map(held, counted.layer_weight_bytes)),
                  activation_bytes_per_row=counted.activation_bytes_per_row, host_overhead_s=c.split_s, steps=steps,
                  serial_seconds=c.serial_flops_per_pixel * pixels / rate, shard_seconds=shard,
                  unit_bytes=tuple(map(held, counted.unit_bytes)) if sharded else (), gathers_overlap=sharded,
                  overlaps_all_to_all=overlaps_all_to_all, fixed_seconds=fixed)
