"""`tandem bench`: the one-device reference and each strategy on the same model, seed and inputs, in one run.

On CPU devices every device gets an equal share of the cores; the reference ("serial") runs in this process
with one device's share, a second reference with all cores. Each strategy runs the same sampler loop (DDIM,
`steps` calls) through a WorkerPool. The variants take turns within every repeat (serial, all cores, each
strategy; then again), so a machine whose speed drifts affects them alike. Ratios from one run are what count.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from dataclasses import dataclass, field

import torch

from .benchmodels import BenchModel, build_bench_model
from .calls import ModelCall
from .config import ParallelConfig
from .executor import ParallelExecutor
from .models.diffusers_unet import FAMILY, forward
from .models.stages import synchronize
from .pool import WorkerPool
from .sampling import denoise, initial_noise, make_scheduler
from .tiny.model import SCHEDULER_CONFIG

CFG_SCALE = 7.5


@dataclass(frozen=True)
class Job:
    """What one strategy is measured on: cfg uses one image with guidance; batch two images without."""

    images: int
    cfg: float


JOBS = {"cfg": Job(1, CFG_SCALE), "batch": Job(2, 1.0), "asyncdiff": Job(1, CFG_SCALE)}


@dataclass
class LoopResult:
    latents: torch.Tensor
    per_call: list[float]
    end_to_end: list[float]
    overhead: list[float]
    compute: list[float]  # the slowest worker's own compute time per call (pool runs only)
    staged: list[dict] = field(default_factory=list)  # asyncdiff, per call: bytes handed over, longest exposed wait


def parse_resolution(text: str | int) -> tuple[int, int]:
    """"256" -> (256, 256); "1024x768" -> (1024, 768) as (H, W)."""
    parts = str(text).lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"resolution {text!r}: write pixels as 256 or 1024x768") from None
    if len(values) not in (1, 2) or min(values) < 8:
        raise ValueError(f"resolution {text!r}: write pixels as 256 or 1024x768 (at least 8)")
    return (values[0], values[-1])


def _inputs(model: BenchModel, job: Job, resolution: tuple[int, int]):
    h, w = (r // model.latent_factor for r in resolution)
    noise = initial_noise(0, (job.images, model.unet.config.in_channels, h, w))
    generator = torch.Generator().manual_seed(1)
    context = torch.randn(job.images, *model.context_shape, generator=generator)
    uncond = torch.randn(job.images, *model.context_shape, generator=generator)
    return noise, context, uncond


def _local_forward(model: BenchModel, call: ModelCall) -> torch.Tensor:
    """One call on the model's own device (the one-device reference), finished before it returns."""
    device = next(model.unet.parameters()).device
    with torch.inference_mode():
        out = forward(model.unet, call.to(device))
    synchronize(device)
    return out


def run_once(model: BenchModel, job: Job, resolution, steps: int, result: LoopResult, timed: bool,
             executor=None) -> None:
    """One run of the sampler loop, locally or through `executor`; its timings go into `result` if `timed`."""
    noise, context, uncond = _inputs(model, job, resolution)
    weight = next(model.unet.parameters())
    context, uncond = context.to(weight.device, weight.dtype), uncond.to(weight.device, weight.dtype)
    per_call, overhead, compute, staged, counter = [], [], [], [], [0]
    if executor is not None:
        executor.new_job()

    def denoiser(x, t, ctx):
        call = ModelCall(x, t, ctx, model.extras(x.shape[0]), branches=2 if job.cfg != 1.0 else 1, index=counter[0])
        counter[0] += 1
        started = time.perf_counter()
        if executor is None:
            out = _local_forward(model, call)
        else:
            out = executor(model.unet, FAMILY, call, job.cfg)
        per_call.append(time.perf_counter() - started)
        if executor is not None:
            compute.append(max(executor.pool.last_compute_seconds.values()))
            overhead.append(per_call[-1] - compute[-1])
            if executor.config.strategy == "asyncdiff":
                replies = executor.last_replies.values()
                staged.append({"bytes": sum(r["bytes_sent"] for r in replies),
                               "wait": max(r["wait"] for r in replies), "step": counter[0] - 1})
        return out

    started = time.perf_counter()
    result.latents, _ = denoise(denoiser, make_scheduler("ddim", SCHEDULER_CONFIG), noise, context, uncond, job.cfg,
                                steps, progress=False)
    if timed:
        result.end_to_end.append(time.perf_counter() - started)
        result.per_call += per_call
        result.overhead += overhead
        result.compute += compute
        result.staged += staged


def run_loop(model: BenchModel, job: Job, resolution, steps: int, repeats: int, executor=None) -> LoopResult:
    """The sampler loop: one warm-up run, then `repeats` timed runs (repeats=0: one run, timed)."""
    result = LoopResult(None, [], [], [], [])
    for repeat in range(repeats + 1):
        run_once(model, job, resolution, steps, result, timed=repeat > 0 or repeats == 0, executor=executor)
    return result


def _ideal(model: BenchModel, rows: int, share_rows: int, resolution, calls: int = 8) -> float:
    """time(whole call) / time(largest share), on one device, measured alternately so drift hits both alike."""
    whole_inputs, share_inputs = (_inputs(model, Job(r, 1.0), resolution) for r in (rows, share_rows))
    whole = ModelCall(whole_inputs[0], torch.tensor(500), whole_inputs[1], model.extras(rows))
    share = ModelCall(share_inputs[0], torch.tensor(500), share_inputs[1], model.extras(share_rows))
    times: dict[int, list[float]] = {rows: [], share_rows: []}
    for i in range(calls + 1):
        for size, call in ((rows, whole), (share_rows, share)):
            started = time.perf_counter()
            _local_forward(model, call)
            if i:
                times[size].append(time.perf_counter() - started)
    return statistics.median(times[rows]) / statistics.median(times[share_rows])


def psnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    """PSNR in dB relative to the reference's value range (inf when identical)."""
    mse = (reference.double() - other.double()).pow(2).mean().item()
    span = (reference.max() - reference.min()).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(span * span / mse)).item()


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run_bench(model_name: str = "small", devices: str = "cpu:2", strategies=("cfg", "batch"), steps: int = 20,
              resolution=None, repeats: int = 2, dtype: str = "auto", progress=print, asyncdiff: dict | None = None) -> dict:
    """Runs the benchmark; returns the JSON-ready report (see PERFORMANCE.md).

    On CUDA devices the one-device reference runs on the first of them, in fp16 unless `dtype` says otherwise.
    asyncdiff: its knobs (warmup, stride, time_shift, stages) when "asyncdiff" is among the strategies.
    """
    for strategy in strategies:
        if strategy not in JOBS:
            raise ValueError(f"bench strategy {strategy!r} is not available; choose from: {', '.join(JOBS)}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    pool = WorkerPool(devices)
    n = len(pool.start().devices)
    reference_device = torch.device(pool.devices[0])
    if dtype == "auto":
        dtype = "fp16" if reference_device.type == "cuda" else "fp32"
    model = build_bench_model(model_name, DTYPES[dtype])
    model.unet.to(reference_device)
    resolution = parse_resolution(resolution or model.default_resolution)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // n)
    results = []
    try:
        for job in dict.fromkeys(JOBS[s] for s in strategies):  # each distinct job once, in the order asked
            mine = [s for s in strategies if JOBS[s] == job]
            # Variants run in rotation within every repeat, so the machine's drift hits them all alike.
            variants = {"serial": (share, None), "all cores": (cores, None)}
            variants.update({s: (1, ParallelExecutor(pool, ParallelConfig(devices, s, **(
                (asyncdiff or {}) if s == "asyncdiff" else {})))) for s in mine})
            measured = {name: LoopResult(None, [], [], [], []) for name in variants}
            progress(f"[bench] {job.images} image(s), cfg {job.cfg:g}: {', '.join(variants)} in rotation")
            for repeat in range(repeats + 1):
                for name, (threads, executor) in variants.items():
                    # The host only steps the scheduler in pool runs: idle OpenMP threads would spin on the workers' cores.
                    torch.set_num_threads(threads)
                    run_once(model, job, resolution, steps, measured[name], timed=repeat > 0 or repeats == 0,
                             executor=executor)
            torch.set_num_threads(share)
            rows = job.images * (2 if job.cfg != 1.0 else 1)
            ideal = _ideal(model, rows, -(-rows // n), resolution)
            serial, all_cores = measured["serial"], measured["all cores"]
            results.append(_row("serial", 1, serial, serial, all_cores, 1.0, [_peak_memory(reference_device)], job))
            for strategy in mine:
                row = _row(strategy, n, measured[strategy], serial, all_cores, ideal, pool.memory(), job)
                if strategy == "asyncdiff":
                    row.update(_staged_figures(variants[strategy][1], measured[strategy], row))
                results.append(row)
    finally:
        pool.shutdown()
        torch.set_num_threads(cores)
    return {"model": model_name, "resolution": list(resolution), "steps": steps, "devices": list(pool.devices),
            "dtype": dtype, "threads_per_device": share, "results": results}


def _row(strategy, n, result: LoopResult, serial: LoopResult, all_cores: LoopResult, ideal, memory, job) -> dict:
    per_call = statistics.median(result.per_call)
    serial_call = statistics.median(serial.per_call)
    return {
        "strategy": strategy, "devices": n, "job": {"images": job.images, "cfg": job.cfg},
        "seconds_per_call_median": per_call,
        "end_to_end_seconds_median": statistics.median(result.end_to_end),
        "speedup_vs_serial": serial_call / per_call,
        "ideal_speedup": ideal,
        "speedup_vs_serial_all_cores": statistics.median(all_cores.per_call) / per_call,
        "max_abs_diff_vs_serial": (result.latents - serial.latents).abs().max().item(),
        "psnr_vs_serial_db": psnr(serial.latents, result.latents),
        "overhead_seconds_per_call_median": statistics.median(result.overhead) if result.overhead else 0.0,
        # What the devices allowed when all ran at once: serial time / the slowest worker's compute time.
        "compute_bound_speedup": serial_call / statistics.median(result.compute) if result.compute else 1.0,
        "peak_memory_bytes_per_device": memory,
    }


def _staged_figures(executor, result: LoopResult, row: dict) -> dict:
    """asyncdiff: the ideal from the measured cut (1 / the largest stage's share of the work), what crosses
    between stages per call, and how long stages sat waiting on it after their own compute (the part of the
    transfer not hidden behind compute), over the asynchronous calls."""
    plan = executor.stage_plan
    shares = [s["share"] for s in plan["stages"]]
    warm = executor.config.warmup
    async_calls = [c for c in result.staged if c["step"] >= warm] or result.staged
    rows = result.latents.shape[0] * (2 if row["job"]["cfg"] != 1.0 else 1)
    transfer = executor.probe_transfer(rows) if len(shares) > 1 else 0.0
    exposed = statistics.median(c["wait"] for c in async_calls)
    return {"ideal_speedup": 1.0 / max(shares), "stage_shares": shares,
            "stage_layers": [s["layers"] for s in plan["stages"]],
            "warmup": warm, "stride": executor.config.stride, "time_shift": executor.config.time_shift,
            "transfer_bytes_per_call_median": statistics.median(c["bytes"] for c in async_calls),
            "transfer_seconds_alone": transfer, "exposed_wait_seconds_per_call_median": exposed,
            "overlapped_fraction": max(0.0, 1.0 - exposed / transfer) if transfer > 0 else 1.0}


def format_table(report: dict) -> str:
    """ideal: serial time of the whole call / of the largest share, each measured alone on one device.
    ceiling: serial time / the slowest worker's compute while all devices run at once (shared caches, memory
    bandwidth, clocks); the gap between speedup and ceiling is the pool's own overhead."""
    head = (f"model {report['model']}, {report['resolution'][0]}x{report['resolution'][1]} px, {report['steps']} calls, "
            f"devices {','.join(report['devices'])} ({report['threads_per_device']} thread(s) each)")
    lines = [head, f"{'strategy':<9}{'dev':>4}{'ms/call':>10}{'e2e s':>8}{'speedup':>9}{'ideal':>7}{'%ideal':>8}"
                   f"{'ceiling':>8}{'vs all':>8}{'max|diff|':>11}{'PSNR dB':>9}{'ovh ms':>8}{'peak MiB/dev':>16}"]
    for r in report["results"]:
        pct = 100 * r["speedup_vs_serial"] / r["ideal_speedup"]
        lines.append(f"{r['strategy']:<9}{r['devices']:>4}{1000 * r['seconds_per_call_median']:>10.1f}"
                     f"{r['end_to_end_seconds_median']:>8.2f}{r['speedup_vs_serial']:>8.2f}x{r['ideal_speedup']:>6.2f}x"
                     f"{pct:>7.0f}%{r['compute_bound_speedup']:>7.2f}x{r['speedup_vs_serial_all_cores']:>7.2f}x{r['max_abs_diff_vs_serial']:>11.1e}"
                     f"{r['psnr_vs_serial_db']:>9.1f}{1000 * r['overhead_seconds_per_call_median']:>8.1f}"
                     f"{'/'.join(str(m // 2**20) for m in r['peak_memory_bytes_per_device']):>16}")
    for r in report["results"]:
        if "stage_shares" in r:
            lines.append(f"asyncdiff: {len(r['stage_shares'])} stages, work shares "
                         f"{' / '.join(f'{100 * s:.1f}%' for s in r['stage_shares'])} (cut after "
                         f"{', '.join(layers[1] for layers in r['stage_layers'][:-1])}); warm-up {r['warmup']} "
                         f"step(s), stride {r['stride']}; {r['transfer_bytes_per_call_median'] / 2**20:.2f} MiB "
                         f"between stages per call, {1000 * r['transfer_seconds_alone']:.1f} ms alone, "
                         f"{1000 * r['exposed_wait_seconds_per_call_median']:.1f} ms of it exposed "
                         f"({100 * r['overlapped_fraction']:.0f}% overlapped with compute)")
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=float)
