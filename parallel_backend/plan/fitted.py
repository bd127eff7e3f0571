"""The GPU model fitted to published measurements: its global constants (Constants; FITTED, the ones
plan/published.py fits to tests/data/published_gpu_figures.csv, recorded here) and a job's model.Inputs from
counted FLOPs under them (`job_inputs`). Pure arithmetic; nothing is timed.

What it adds to FLOPs over a GPU's peak (each constant global, none per job):
- the host's launches, from the model's own count: a call of the model launches `launches` kernels (plan/paper.py
  counts them on the meta device, as it counts FLOPs), each costing the host `launch_s` to issue. The host issues
  them ahead of the GPU (eager dispatch is asynchronous), so a call takes the longer of its GPU work and its
  launches: max((f + half_work) / (P x peak_fraction), launches x launch_s), below. A DiT's blocks launch many
  small kernels for their FLOPs (norms, modulation, RoPE); a UNet at 3840 px computes far longer than it launches.
  Every rank of a sequence, patch or tensor split launches every layer (its part of the work, all of the
  launches); a stage of asyncdiff its layers' share. How the run launches (MODES): eager, each kernel; compiled
  (torch.compile), `compiled_launches` of them (fused); graphed (CUDA graphs replay a call: DistriFusion's
  default), none;
- a per-step host part, `step_s` (the sampler's own work and the synchronisation at the step's end), paid whole by
  every device and never hidden;
- compute efficiency as a function of the work per device: a call of f FLOPs on a GPU of peak P runs at
  peak_fraction x f / (f + half_work) of P, so its GPU work takes (f + half_work) / (P x peak_fraction);
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

    step_s: float
    launch_s: float
    peak_fraction: float
    half_work: float  # FLOPs
    split_s: float
    message_s: float
    serial_flops_per_pixel: float
    compiled_launches: float

    def as_tuple(self) -> tuple[float, ...]:
        return (self.step_s, self.launch_s, self.peak_fraction, self.half_work, self.split_s, self.message_s,
                self.serial_flops_per_pixel, self.compiled_launches)

    def launch_seconds(self, launches: int, mode: str = "eager") -> float:
        """The host's time to issue a call of `launches` kernels run in `mode` (one of MODES)."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
        return launches * self.launch_s * {"eager": 1.0, "compiled": self.compiled_launches, "graphed": 0.0}[mode]


MODES = ("eager", "compiled", "graphed")  # how a run launches its kernels: each, torch.compile's fused, a CUDA graph


# plan/published.py `fit` over the table's predictable rows (tests/test_plan_published.py refits and checks these
# figures, so a change of the table or the model shows here). A constant near 0 (split_s, message_s) ran to the
# search's floor: the table does not support it; it stays a term so that a calibration on a lent GPU can set it.
# peak_fraction and compiled_launches stayed at FIT_START's values: the speed-ups barely depend on them (ratios of
# times that scale together), so the table does not pin them; a calibration measures the former.
FITTED = Constants(step_s=0.018221188003905108, launch_s=2.8381350971865182e-05, peak_fraction=0.7,
                   half_work=1346373803500.1826, split_s=3.39826781949506e-12, message_s=3.581747930283173e-15,
                   serial_flops_per_pixel=127525630.32435475, compiled_launches=0.2)


def job_inputs(counted, peak_flops: float, link: Link, branches: int, steps: int, pixels: int, c: Constants,
               ranks: int, mode: str = "eager", overlaps_all_to_all: bool = False,
               sharded: bool = False, weights_dtype: str = "bf16") -> Inputs:
    """model.Inputs of a job from its counted figures (plan/paper.py Counted) on a GPU of `peak_flops` joined by
    `link`, under constants `c`: every call the longer of its GPU work, (f + half_work) / (peak x peak_fraction),
    and its launches (counted.launches, issued as `mode` issues them), plus step_s; a sequence rank's part, for every
    split of up to `ranks` ranks, from its share of one row's FLOPs and all of the launches; the serial part of the
    run from its output's `pixels`. sharded: with the units sharded weights gather, posted ahead as on CUDA.
    weights_dtype: a WEIGHT_BYTES name; the weights' bytes (held, per layer, gathered) at that size a parameter."""
    scale = WEIGHT_BYTES[WEIGHTS_DTYPE.validate(weights_dtype)] * counted.parameters / counted.weight_bytes

    def held(nbytes) -> int:
        return round(nbytes * scale)

    rate = peak_flops * c.peak_fraction
    launches = c.launch_seconds(counted.launches, mode)

    def call(flops: float) -> float:
        return max((flops + c.half_work) / rate, launches) + c.step_s

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
                  overlaps_all_to_all=overlaps_all_to_all, fixed_seconds=c.step_s, launch_seconds=launches)
