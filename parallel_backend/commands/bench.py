"""`tandem bench`: the one-device reference and each strategy on the same model, seed and inputs, in one run.

On CPU devices every device gets an equal share of the cores; the reference ("serial") runs in this process
with one device's share, a second reference with all cores. Each strategy runs the same sampler loop (the
model's: DDIM for UNets, flow-matching Euler for transformers; `steps` calls) through a WorkerPool. The variants
take turns within every repeat (serial, all cores, each strategy; then again), so a machine whose speed drifts
affects them alike. Ratios from one run are what count.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..runtime import validation
from .. import strategies
from ..models.benchmodels import build_bench_model
from ..engine.pool_engine import engine_for, sequence_hint
from ..hosts.executor import ParallelExecutor
from ..engine.mesh import resolve
from ..engine.oracle import LoopResult, job_for, local_forward, psnr, run_once, sample_call
from ..runtime.pool import WorkerPool
from ..runtime.recipe import weights_bytes
from ..runtime.portable import cpu_cores, peak_memory_bytes
from .bench_inputs import check_bench_inputs, parse_resolution
from .bench_load import SPREAD_LIMIT, _other_load, _spread, note_other_load
from .bench_vae import decode_figures
from ..models.benchmodels_vae import LATENT_CHANNELS, build_bench_vae
from ..runtime.words import counted



def check_resolution(model, resolution: tuple[int, int], strategies_: tuple, device: str,
                     cfg: float | None = None, images: int | None = None) -> tuple[int, int]:
    """`resolution` if the model's latents tile it exactly and the largest bench job fits in `device`'s memory."""
    model.check_resolution(resolution)
    jobs = [job_for(s, cfg, images) for s in strategies_]
    rows = max(job.images * (2 if job.cfg != 1.0 else 1) for job in jobs)
    needed = model.memory_bytes(rows, resolution)
    validation.fits_in_memory(f"resolution {resolution[0]}x{resolution[1]} for model {model.name}", needed, device,
                              "choose a smaller --resolution")
    return resolution


def _ratio(whole, part, calls: int = 8) -> float:
    """time(whole()) / time(part()), each the median of `calls`, measured alternately so drift hits both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(calls + 1):
        for measured, run in zip(times, (whole, part)):
            started = time.perf_counter()
            run()
            if i:
                measured.append(time.perf_counter() - started)
    return statistics.median(times[0]) / statistics.median(times[1])


def _ideal(model, rows: int, share_rows: int, resolution, calls: int = 8) -> float:
    """time(whole call) / time(largest share), on one device."""
    whole, share = sample_call(model, rows, resolution), sample_call(model, share_rows, resolution)
    return _ratio(lambda: local_forward(model, whole), lambda: local_forward(model, share), calls)


def _strategy_ideal(strategy, model, config, n: int, rows: int, guided: bool, resolution) -> float | None:
    """The ideal of a strategy whose ranks share rows in another way than by rows (`bench_part`): the whole
    call on one device over what its busiest rank computes alone; None for row shares."""
    hint = sequence_hint(model.module, model.family)  # the mesh the engine gives (usp's default split follows heads)
    mesh = resolve(config, n, 2 if guided else 1, rows, hint)
    group_call = sample_call(model, -(-rows // mesh.groups), resolution)
    part = strategy.bench_part(model, group_call, mesh)
    if part is None:
        return None
    whole = sample_call(model, rows, resolution)
    return _ratio(lambda: local_forward(model, whole), part)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # bench_inputs.DTYPE_NAMES


def run_bench(model_name: str = "small", devices: str = "cpu:2", strategies_: tuple = ("cfg", "batch"),
              steps: int = 20, resolution=None, repeats: int = 2, dtype: str = "auto", progress=print,
              knobs: dict | None = None, frames: int | None = None, cfg: float | None = None,
              images: int | None = None, balance: str | None = None, test_slowdown: str | None = None,
              plan: bool = True, decode: bool = True) -> dict:
    """Runs the benchmark; returns the JSON-ready report (see PERFORMANCE.md).

    On CUDA devices the one-device reference runs on the first of them, in fp16 unless `dtype` says otherwise.
    knobs: strategy knobs (warmup, stride, time_shift, stages, ...) for the strategies they apply to.
    cfg: the guidance scale of every job (1: one branch; None: each strategy's own bench job).
    frames: frames per clip, for video models only (None: the model's default).
    images: images per job (None: each strategy's own bench job).
    balance: mixed devices (speeds.py): "equal", "balanced" or "both" runs each strategy with equal shares and/or
      shares sized by the measured device speeds, as rows "batch (equal)", "batch (balanced)", whose ideal is
      the sum of the devices' speeds over the fastest alone; None: the config's default.
    test_slowdown: tests and proofs only: "1:2" makes worker 1 repeat its compute twice (a stand-in for a
      slower card; slowdown.py). The serial reference is never slowed: it stands for the fastest device.
    plan: False leaves out the plan's prediction and the measurements it needs (about 10 s whatever the bench's
      size): the rows have no predicted_speedup and the table's plan column is blank.
    decode: each job's end to end also with the VAE decode of its images (the bench model's VAE, bench_vae.py:
      here for the serial row, in bands on the pool for the others), timed in turn after the job's runs; False, or
      a bench model without a VAE, leaves it out.
    The report's "disturbed" lists what made the figures unreliable (other load, repeats spread > 10 %).
    """
    checked = check_bench_inputs(model_name, devices, strategies_, steps, resolution, repeats, dtype, knobs, frames,
                                 cfg, images, balance, test_slowdown)
    steps, repeats, cfg, images = checked.steps, checked.repeats, checked.cfg, checked.images
    modes, weight_modes, configs, meshes = checked.modes, checked.weight_modes, checked.configs, checked.meshes
    variant_configs, resolved, fixed_resolution = checked.variant_configs, checked.devices, checked.resolution
    reference_device = torch.device(resolved[0])
    if dtype == "auto":
        dtype = "fp16" if reference_device.type == "cuda" else "fp32"
    model = build_bench_model(model_name, DTYPES[dtype], frames)
    sequence = sequence_hint(model.module, model.family)
    for s in strategies_:  # the engine would refuse these at the first call
        strategies.get(s).check_family(model.family)
        strategies.get(s).check_model(meshes[s], sequence)
    resolution = check_resolution(model, fixed_resolution or parse_resolution(model.default_resolution),
                                  strategies_, str(reference_device), cfg, images)
    model.module.to(reference_device)
    options = configs[strategies_[0]].pool_options()
    if options["max_models"] is None:  # every variant's weights stay loaded: no variant's time pays for a load
        options["max_models"] = max(2, len(variant_configs) + 1)
    # built once for every job's decode (None: left out, or a bench model without a VAE)
    bench_vae = build_bench_vae(model_name) if decode and model_name in LATENT_CHANNELS else None
    pool = WorkerPool(devices, test_slowdown=test_slowdown, **options)
    n = len(pool.start().devices)
    cores = len(cpu_cores())
    share = max(1, cores // n)
    results, disturbed = [], []
    other_load = _other_load()
    try:
        from ..plan.bench_check import Predictor

        predictor = Predictor(pool, model, resolution, steps, progress) if plan else None  # before any strategy runs
        for job in dict.fromkeys(job_for(s, cfg, images) for s in strategies_):  # each distinct job once, in order
            mine = [s for s in strategies_ if job_for(s, cfg, images) == job]
            # Variants run in rotation within every repeat, so the machine's drift hits them all alike.
            variants = {"serial": (share, None), "all cores": (cores, None)}
            named = {_variant(s, mode, w, weight_modes): (s, variant_configs[s, mode, w])
                     for s in mine for mode in modes for w in weight_modes}
            variants.update({name: (1, ParallelExecutor(pool, config)) for name, (s, config) in named.items()})
            measured = {name: LoopResult() for name in variants}
            rows, branches = job.images * (2 if job.cfg != 1.0 else 1), 2 if job.cfg != 1.0 else 1
            if predictor is not None:
                predictor.measure(rows, branches)  # the plan's inputs for this job, before any of its runs
            progress(f"[bench] {counted(job.images, 'image')}, cfg {job.cfg:g}: {', '.join(variants)} in rotation")
            for repeat in range(repeats + 1):
                for name, (threads, executor) in variants.items():
                    # The host only steps the scheduler in pool runs: idle OpenMP threads would spin on the workers' cores.
                    torch.set_num_threads(threads)
                    run_once(model, job, resolution, steps, measured[name], timed=repeat > 0 or repeats == 0,
                             executor=executor)
                if repeat > 0 and predictor is not None:
                    predictor.sample(rows, branches)  # the plan's inputs in turn with the variants, never inside them
            torch.set_num_threads(share)
            vae = decode_figures(engine_for(pool), bench_vae, model_name, resolution, job.images, model.frames,
                                 repeats, share, disturbed) if bench_vae is not None else None
            for name, result in measured.items():
                if _spread(result.end_to_end) > SPREAD_LIMIT:
                    disturbed.append(f"{name} ({counted(job.images, 'image')}, cfg {job.cfg:g}): repeats spread "
                                     f"{100 * _spread(result.end_to_end):.0f}% (> {100 * SPREAD_LIMIT:.0f}%)")
            ideal = _ideal(model, rows, -(-rows // n), resolution)
            serial, all_cores = measured["serial"], measured["all cores"]
            whole = weights_bytes(model.module)
            results.append(_row("serial", 1, serial, serial, all_cores, 1.0, [peak_memory_bytes(reference_device)], job))
            results[-1]["weights_bytes_per_device"] = [whole]
            serial_row = results[-1]
            serial_row.update(_with_decode(serial_row, vae, "serial_seconds", serial_row))
            for name, (strategy, config) in named.items():
                own = _strategy_ideal(strategies.get(strategy), model, config, n, rows, job.cfg != 1.0, resolution)
                row = _row(name, n, measured[name], serial, all_cores, own or ideal, pool.memory(), job)
                row["weights_bytes_per_device"] = _weights_per_device(measured[name], n, whole)
                if len(modes) > 1:  # the pool holds the last mode's setup (e.g. a stage cut): this variant's again
                    run_once(model, job, resolution, 1, LoopResult(), timed=False, executor=variants[name][1])
                row.update(strategies.get(strategy).bench_figures(variants[name][1], measured[name], row))
                if predictor is not None:
                    row.update(_prediction(predictor.predict(configs[strategy], rows, branches), row))
                row.update(_speeds_ideal(variants[name][1], balance))
                row.update(_with_decode(row, vae, "bands_seconds", serial_row))
                results.append(row)
    finally:
        pool.shutdown()
        torch.set_num_threads(cores)
    load = note_other_load(other_load, disturbed)
    return {"model": model_name, "resolution": list(resolution), "frames": model.frames, "steps": steps,
            "devices": list(pool.devices), "dtype": dtype, "threads_per_device": share, "results": results,
            "disturbed": disturbed, "other_load_share": load}


def _with_decode(row: dict, vae: dict | None, which: str, serial_row: dict) -> dict:
    """A row's end to end with its VAE decode (`which` of decode_figures: here or in bands), and its speed-up
    over the serial row's, decode included."""
    if vae is None:
        return {}
    total = row["end_to_end_seconds_median"] + vae[which]
    serial_total = serial_row.get("end_to_end_with_decode_seconds", total)
    return {"decode_seconds": vae[which], "decode_bands": 1 if which == "serial_seconds" else vae["bands"],
            "decode_max_abs_diff_vs_serial": 0.0 if which == "serial_seconds" else vae["max_abs_diff_vs_serial"],
            "end_to_end_with_decode_seconds": total, "speedup_end_to_end_with_decode": serial_total / total}


def _variant(strategy: str, mode: str | None, weights: str, weight_modes: tuple) -> str:
    """A row's name: the strategy, then its share mode and where its weights live where the bench compares them
    (or they are not the default): "ulysses (sharded)", "batch (equal, sharded)"."""
    shown = weight_modes != ("replicated",)
    parts = [part for part in (mode, weights if shown else None) if part is not None]
    return strategy if not parts else f"{strategy} ({', '.join(parts)})"


def _speeds_ideal(executor, balance: str | None) -> dict:
    """With --balance: the ideal of mixed devices, the sum of their measured speeds over the fastest alone (the
    serial reference), and those speeds; the speeds of the first model and shape the pool measured."""
    from ..runtime.speeds import speeds_of

    measured = list(executor.engine.state("device speeds").values()) if balance else []  # one-row seconds
    if not measured:
        return {}
    speeds = speeds_of(measured[0])
    return {"ideal_speedup": sum(speeds), "device_speeds": list(speeds)}


def _weights_per_device(result: LoopResult, n: int, whole: int) -> list[int]:
    """The weights each of the pool's `n` devices held in a variant's last call, as its worker reported them
    (whole, cut by tensor or sharded); the whole model's for a device that holds none of it (it sat out)."""
    held = result.calls[-1].get("weights", {}) if result.calls else {}
    return [held.get(rank, whole) for rank in range(n)]


def _prediction(candidate, row: dict) -> dict:
    """The plan's figures for a measured row: its predicted speed-up per call and the error against the measured
    one (predicted / measured - 1)."""
    if candidate is None:
        return {}
    return {"predicted_speedup": candidate.predicted_speedup,
            "prediction_error": candidate.predicted_speedup / row["speedup_vs_serial"] - 1.0,
            "prediction_reason": candidate.reason}


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


def format_table(report: dict) -> str:
    """ideal: serial time of the whole call / of the largest share, each measured alone on one device.
    ceiling: serial time / the slowest worker's compute while all devices run at once (shared caches, memory
    bandwidth, clocks); the gap between speedup and ceiling is the pool's own overhead."""
    clip = f" x {report['frames']} frames" if report.get("frames") else ""
    head = (f"model {report['model']}, {report['resolution'][0]}x{report['resolution'][1]} px{clip}, {report['steps']} calls, "
            f"devices {','.join(report['devices'])} ({report['threads_per_device']} thread(s) each)")
    width = max([9, *(len(r["strategy"]) + 1 for r in report["results"])])
    lines = [head, f"{'strategy':<{width}}{'dev':>4}{'ms/call':>10}{'e2e s':>8}{'speedup':>9}{'ideal':>7}{'%ideal':>8}"
                   f"{'ceiling':>8}{'plan':>7}{'err':>6}{'vs all':>8}{'max|diff|':>11}{'PSNR dB':>9}{'ovh ms':>8}{'peak MiB/dev':>16}{'weights MiB/dev':>17}"]
    for r in report["results"]:
        pct = 100 * r["speedup_vs_serial"] / r["ideal_speedup"]
        lines.append(f"{r['strategy']:<{width}}{r['devices']:>4}{1000 * r['seconds_per_call_median']:>10.1f}"
                     f"{r['end_to_end_seconds_median']:>8.2f}{r['speedup_vs_serial']:>8.2f}x{r['ideal_speedup']:>6.2f}x"
                     f"{pct:>7.0f}%{r['compute_bound_speedup']:>7.2f}x{_plan_cells(r)}"
                     f"{r['speedup_vs_serial_all_cores']:>7.2f}x{r['max_abs_diff_vs_serial']:>11.1e}"
                     f"{r['psnr_vs_serial_db']:>9.1f}{1000 * r['overhead_seconds_per_call_median']:>8.1f}"
                     f"{'/'.join(str(m // 2**20) for m in r['peak_memory_bytes_per_device']):>16}"
                     f"{'/'.join(f'{w / 2**20:.0f}' for w in r.get('weights_bytes_per_device', [])):>17}")
    lines += [r["summary"] for r in report["results"] if r.get("summary")]
    decoded = [r for r in report["results"] if "end_to_end_with_decode_seconds" in r]
    if decoded:
        lines.append("end to end with the VAE decode (here for serial, in bands on the pool for the others): " + "; ".join(
            f"{r['strategy']} {r['end_to_end_with_decode_seconds']:.2f} s (decode {r['decode_seconds']:.2f} s, "
            f"{r['speedup_end_to_end_with_decode']:.2f}x)" for r in decoded))
    if report.get("disturbed"):
        lines.append("DISTURBED RUN, figures unreliable: " + "; ".join(report["disturbed"]))
    return "\n".join(lines)


def _plan_cells(row: dict) -> str:
    if "predicted_speedup" not in row:
        return f"{'':>7}{'':>6}"
    return f"{row['predicted_speedup']:>6.2f}x{100 * row['prediction_error']:>+5.0f}%"
