"""The test oracle and the bench's sampler loop: one model, seed and inputs, run on one device or on a pool.

`run_loop` denoises with the model's own sampler (DDIM for UNets, flow-matching Euler for transformers) for
`steps` calls, either locally (the one-device reference) or through a ParallelExecutor; tests compare the two
(TESTING.md), `tandem bench` times them. `psnr` is the one definition of PSNR used by the bench, the tests and
the demo. `sample_call` is one call on the same seeded inputs, which the bench and the cost model (plan/) time.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..runtime.calls import ModelCall
from ..models import forward_for_family
from ..models.stages import synchronize
from ..models.sampling import denoise, initial_noise
from .jobs import CFG_SCALE, Job, job_for  # noqa: F401 (the bench's jobs, run here)

@dataclass
class LoopResult:
    latents: torch.Tensor | None = None
    per_call: list[float] = field(default_factory=list)
    end_to_end: list[float] = field(default_factory=list)
    overhead: list[float] = field(default_factory=list)  # per call: its time less the slowest worker's compute
    compute: list[float] = field(default_factory=list)  # the slowest worker's own compute time per call (pool runs)
    calls: list[dict] = field(default_factory=list)  # pool runs, per call: step, bytes between devices, longest wait


def inputs(model, job: Job, resolution):
    """(noise, context, uncond) of a job, the same for every run: seeded."""
    noise = initial_noise(0, model.latent_shape(job.images, resolution))
    generator = torch.Generator().manual_seed(1)
    context = torch.randn(job.images, *model.context_shape, generator=generator)
    uncond = torch.randn(job.images, *model.context_shape, generator=generator)
    return noise, context, uncond


def sample_call(model, images: int, resolution) -> ModelCall:
    """One model call on the seeded inputs of `images` unguided latents at `resolution`, at timestep 500, in the
    model's dtype: the call the bench and the cost model time and count."""
    dtype = next(model.module.parameters()).dtype
    noise, context, _ = inputs(model, Job(images, 1.0), resolution)
    return model.call(noise.to(dtype), torch.tensor(500), context.to(dtype), resolution)


def local_forward(model, call: ModelCall) -> torch.Tensor:
    """One call on the model's own device (the one-device reference), finished before it returns."""
    device = next(model.module.parameters()).device
    with torch.inference_mode():
        out = forward_for_family(model.family)(model.module, call.to(device))
    synchronize(device)
    return out


def run_once(model, job: Job, resolution, steps: int, result: LoopResult, timed: bool, executor=None) -> None:
    """One run of the sampler loop, locally or through `executor`; its timings go into `result` if `timed`."""
    noise, context, uncond = inputs(model, job, resolution)
    weight = next(model.module.parameters())
    context, uncond = context.to(weight.device, weight.dtype), uncond.to(weight.device, weight.dtype)
    run = LoopResult()

    def denoiser(x, t, ctx):
        call = model.call(x, t, ctx, resolution, branches=2 if job.cfg != 1.0 else 1, index=len(run.per_call))
        started = time.perf_counter()
        if executor is None:
            out = local_forward(model, call)
            run.per_call.append(time.perf_counter() - started)
            return out
        done = executor.run(model.module, model.family, call)
        run.per_call.append(time.perf_counter() - started)
        run.compute.append(max(done.compute_s.values()))
        run.overhead.append(run.per_call[-1] - run.compute[-1])
        run.calls.append({"step": call.index, "bytes": done.bytes_sent, "wait": max(done.wait_s.values()),
                          "extra": done.extra, "mesh": done.mesh, "weights": done.weights_bytes})
        return done.out

    started = time.perf_counter()
    with executor.job() if executor is not None else nullcontext():
        result.latents, _ = denoise(denoiser, model.make_scheduler(), noise, context, uncond, job.cfg, steps,
                                    progress=False)
    if timed:
        result.end_to_end.append(time.perf_counter() - started)
        for name in ("per_call", "overhead", "compute", "calls"):
            getattr(result, name).extend(getattr(run, name))


def run_loop(model, job: Job, resolution, steps: int, repeats: int, executor=None) -> LoopResult:
    """The sampler loop: one warm-up run, then `repeats` timed runs (repeats=0: one run, timed)."""
    result = LoopResult()
    for repeat in range(repeats + 1):
        run_once(model, job, resolution, steps, result, timed=repeat > 0 or repeats == 0, executor=executor)
    return result


def psnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    """PSNR in dB relative to the reference's value range (inf when identical)."""
    mse = (reference.double() - other.double()).pow(2).mean().item()
    span = (reference.max() - reference.min()).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(span * span / mse)).item()
