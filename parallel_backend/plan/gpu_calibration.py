"""`tandem plan --calibrate`: the GPU model's per-card figures (plan/fitted.py's constants) measured on the devices
given, written to a JSON file that `tandem plan --gpu NAME --constants FILE` predicts with in place of the fitted
constants for that card.

Measured on the first device (a CPU device with one device's share of the cores, as a worker runs), with the bench
model BENCH (flux-small: Flux.1's blocks at a fraction of the width) at RESOLUTION (larger on a GPU, whose calls
reach their rate only with more work):
- `launch_s`: the host's time per kernel launched: the wall time of the smallest call, one row of one latent token
  and one text token (next to no arithmetic: on a GPU the host's launches are what it waits on), less its few FLOPs
  at the measured rate, over the kernels it launches (`launches`, counted as plan/paper.py counts a model's);
- the compute rate by work per device: what one rank of a Ulysses split of each of SHARDS ranks computes for one
  row (its exchanges stubbed out: the strategy's `bench_part`; 1 rank: the whole call), each timed (the fastest of
  the rounds, the runs taking turns) and its FLOPs counted by torch's FlopCounterMode. A least-squares line through
  (FLOPs, seconds) gives the rate, `flops_per_s` (1 / its slope), and the work a call loses to its start-up,
  `half_work` (its intercept x the rate): fitted.py's GPU work (f + half_work) / rate per call, which the calls
  of the line outlast their launches by far (a call is the longer of the two);
- the link: with two devices, ranks 0 and 1 of a pool started on them swapping 4 bytes and 16 MiB each way
  (plan/probe.py measure_link: bandwidth per direction, latency per message); with one CUDA device, a copy of the
  same sizes from pinned host memory to the device and back (the path a GeForce card without peer-to-peer takes,
  twice per exchange); a CPU device alone has no link.

`constants_for` makes the file's figures the model's: launch_s and half_work as measured, peak_fraction the measured
rate over the card's published peak, and a peer link measured between two devices in place of the named link
(its latency holds a message's launch already: message_s 0); step_s (the sampler's own work per step), split_s, the
serial part and compiled_launches stay fitted (a calibration runs no sampler, no split, no pipeline and no
torch.compile). Measurements, not predictions: the file says on which device and when.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..runtime import validation
from .fitted import FITTED, Constants
from .links import Link

BENCH = "flux-small"
SHARDS = (1, 2, 4, 8)  # Ulysses ranks whose one-rank part is timed: the work per device from whole to an eighth
TINY = (16, 16)  # pixels: one latent token of flux-small (8x VAE, 2x2 patches)
RESOLUTION = {"cpu": 256, "cuda": 2048}  # pixels per side: a whole call of ~6 GFLOP on a CPU, ~2 TFLOP on a GPU
COPY_BYTES = (4, 16 * 2**20)  # the link's two message sizes, as plan/probe.py's
FORMAT = 2  # the file's layout; a file of another is refused (1: a per-call fixed cost, before launches were counted)
# Files of --calibrate run on lent GPUs (tests/gpu/test_plan_calibrate.py copies its file out), kept with the
# repository: docs/gpu-predictions.md lists each as measured.
MEASURED = Path(__file__).resolve().parents[2] / "tests" / "data" / "gpu_calibrations"
FIELDS = ("format", "devices", "device_name", "measured_at", "launch_s", "tiny", "flops_per_s", "half_work_flops",
          "shards", "link")


def calibrate(devices: list[str], repeats: int = 5, budget_s: float = 2.0) -> dict:
    """The figures measured on `devices` (resolved device names; the first runs the calls), as the file holds them."""
    from ..models.benchmodels import build_bench_model
    from .measure import device_share

    device = devices[0]
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = build_bench_model(BENCH, dtype)
    model.module.to(device)
    resolution = (RESOLUTION[device.split(":")[0]],) * 2
    with device_share(device.split(":")[0], len(devices)):
        tiny, shards = _compute(model, resolution, repeats, budget_s)
        name = _device_name(device)
    rate, launch_s, half_work = _line(tiny, shards)
    return {"format": FORMAT, "devices": devices, "device_name": name,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
            "bench_model": BENCH, "resolution": list(resolution), "launch_s": launch_s, "tiny": tiny,
            "flops_per_s": rate, "half_work_flops": half_work, "shards": shards, "link": _link(devices, repeats)}


def _compute(model, resolution, repeats: int, budget_s: float) -> tuple[dict, list[dict]]:
    """(the tiny call's {flops, seconds, launches}, [{ranks, flops, seconds}] for each of SHARDS), the runs taking
    turns in rounds, each the fastest of its runs; every run on the model's device, finished before its time is
    taken."""
    from .. import strategies
    from ..engine.mesh import Mesh
    from ..engine.oracle import sample_call
    from ..models import forward_for_family
    from ..models.stages import synchronize
    from .measure import timed_rounds
    from .paper import count_flops, count_launches

    device = next(model.module.parameters()).device
    tiny = _tiny_call(sample_call(model, 1, TINY)).to(device)
    whole = sample_call(model, 1, resolution).to(device)
    forward = forward_for_family(model.family)

    def finished(run):
        def timed():
            run()
            synchronize(device)
        return timed

    def call(c):
        def run():
            with torch.inference_mode():
                forward(model.module, c)
        return finished(run)

    ulysses = strategies.get("ulysses")
    runs = {"tiny": call(tiny), 1: call(whole)}
    runs.update({n: finished(ulysses.bench_part(model, whole, Mesh("ulysses", 1, 1, (n,), n))) for n in SHARDS[1:]})
    times = timed_rounds(runs, repeats, budget_s)
    with torch.inference_mode():
        flops = {key: count_flops(run)[0] for key, run in runs.items()}
        launches = count_launches(runs["tiny"])
    return ({"flops": flops["tiny"], "seconds": min(times["tiny"]), "launches": launches},
            [{"ranks": n, "flops": flops[n], "seconds": min(times[n])} for n in SHARDS])


def _tiny_call(call):
    """`call` (one latent token) with one text token: next to no arithmetic left."""
    extras = {**call.extras, "txt_ids": call.extras["txt_ids"][:1]}
    return replace(call, context=call.context[:, :1], extras=extras)


def _line(tiny: dict, shards: list[dict]) -> tuple[float, float, float]:
    """(FLOP/s, seconds per kernel launched, half_work FLOPs): the rate and half_work from the least-squares line
    through the shards' (FLOPs, seconds), the launches' time from the tiny call less its FLOPs at that rate."""
    xs, ys = [s["flops"] for s in shards], [s["seconds"] for s in shards]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    if not slope > 0:
        raise RuntimeError("the calibration's calls did not take longer with more work (other load on the device?): "
                           "run --calibrate again on an idle machine")
    launched = max(0.0, tiny["seconds"] - tiny["flops"] * slope)
    return 1.0 / slope, launched / max(1, tiny["launches"]), max(0.0, (my - slope * mx) / slope)


def _link(devices: list[str], repeats: int) -> dict | None:
    """The measured link as the file holds it: between two devices (a pool on them), else a CUDA device's host
    copies, else None."""
    if len(devices) >= 2:
        from ..engine.pool_engine import engine_for
        from ..runtime.pool import WorkerPool
        from .probe import measure_link

        with WorkerPool(devices[:2]) as pool:
            link = measure_link(engine_for(pool), repeats)
        return {"kind": "peer", "bandwidth_bytes_per_s": link.bandwidth, "latency_s": link.latency,
                "source": link.source}
    if devices[0].startswith("cuda"):
        return _host_copies(devices[0], repeats)
    return None


def _host_copies(device: str, repeats: int) -> dict:
    """Copies from pinned host memory to `device` and back, COPY_BYTES each: latency and bandwidth per direction."""
    seconds = {}
    for nbytes in COPY_BYTES:
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        on_device = torch.empty(nbytes, dtype=torch.uint8, device=device)
        best = math.inf
        for _ in range(repeats + 1):
            torch.cuda.synchronize(device)
            began = time.perf_counter()
            on_device.copy_(host, non_blocking=True)
            host.copy_(on_device, non_blocking=True)
            torch.cuda.synchronize(device)
            best = min(best, (time.perf_counter() - began) / 2)
        seconds[nbytes] = best
    small, large = COPY_BYTES
    extra = seconds[large] - seconds[small]
    bandwidth = (large - small) / extra if extra > 0 else large / seconds[large]
    return {"kind": "host-device", "bandwidth_bytes_per_s": bandwidth, "latency_s": seconds[small],
            "source": f"measured on {device}: {large // 2**20} MiB between pinned host memory and the device in "
                      f"{1000 * seconds[large]:.2f} ms each way, {small} bytes in {1e6 * seconds[small]:.0f} us"}


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"CPU ({platform.machine()}), {torch.get_num_threads()} threads"


def load(path) -> dict:
    """A calibration file's figures, checked: a missing or bad figure is refused in one sentence."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--constants {path}: cannot read a calibration file ({exc})") from None
    missing = [k for k in FIELDS if k not in data] if isinstance(data, dict) else list(FIELDS)
    if missing or data["format"] != FORMAT:
        raise ValueError(f"--constants {path}: not a file of tandem plan --calibrate (format {FORMAT}); missing: "
                         f"{', '.join(missing) or 'none, but another format'}")
    for key in ("launch_s", "half_work_flops"):
        validation.finite_number(key, data[key], 0.0, math.inf)
    validation.finite_number("flops_per_s", data["flops_per_s"], 1.0, math.inf)
    return data


def constants_for(data: dict, peak_flops: float) -> tuple[Constants, Link | None]:
    """(constants, the measured peer link or None) for a card of `peak_flops` from a calibration file's figures."""
    peer = data["link"] if data["link"] and data["link"]["kind"] == "peer" else None
    constants = replace(FITTED, launch_s=data["launch_s"], half_work=data["half_work_flops"],
                        peak_fraction=data["flops_per_s"] / peak_flops, message_s=0.0 if peer else FITTED.message_s)
    link = None if peer is None else Link("calibrated", peer["bandwidth_bytes_per_s"], peer["latency_s"],
                                          peer["source"])
    return constants, link


def describe(data: dict) -> str:
    """One line: what the file measured, where and when."""
    link = data["link"]
    said = "no link (one CPU device)" if not link else (
        f"{link['kind']} link {link['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s, {1e6 * link['latency_s']:.0f} us")
    return (f"measured on {', '.join(data['devices'])} ({data['device_name']}) at {data['measured_at']}: "
            f"{1e6 * data['launch_s']:.1f} us per kernel launched, {data['flops_per_s'] / 1e12:.3f} TFLOP/s, half "
            f"work {data['half_work_flops'] / 1e9:.2f} GFLOP, {said}")


def measured_files() -> list[tuple[str, dict]]:
    """(file name, figures) of every calibration kept in MEASURED, by name."""
    return [(path.name, load(path)) for path in sorted(MEASURED.glob("*.json"))]
