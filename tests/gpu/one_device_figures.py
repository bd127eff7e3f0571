"""One device's fp16 figures and layer profile for each bench model `tandem plan` needs on a GPU (sd15, sdxl,
flux-small): the sampler loop's seconds per call on cuda:0 (engine.oracle.run_loop, no pool: the one-device row
of `tandem bench`, which needs two devices) and the time of each of the model's top-level blocks (forward hooks,
synchronized), written as JSON to $OUT/one-device-MODEL.json. Run by tests/gpu/lent.sh; needs CUDA.

    python3 tests/gpu/one_device_figures.py sd15 sdxl flux-small
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from parallel_backend.engine.jobs import job_for
from parallel_backend.engine.oracle import run_loop
from parallel_backend.models.benchmodels import build_bench_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def blocks(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The model's blocks: the children of its ModuleLists (down/up blocks, transformer blocks), else its children."""
    lists = [(name, child) for name, child in module.named_children() if isinstance(child, torch.nn.ModuleList)]
    if not lists:
        return list(module.named_children())
    return [(f"{name}.{i}", block) for name, blocks_ in lists for i, block in enumerate(blocks_)]


def layer_profile(model, job, resolution, device) -> dict[str, float]:
    """Milliseconds per top-level block over one sampler run (the median of its calls)."""
    times: dict[str, list[float]] = {}
    handles = []
    for name, block in blocks(model.module):
        def before(_module, _inputs, name=name):
            sync(device)
            times.setdefault(name, []).append(-time.perf_counter())

        def after(_module, _inputs, _output, name=name):
            sync(device)
            times[name][-1] += time.perf_counter()

        handles += [block.register_forward_pre_hook(before), block.register_forward_hook(after)]
    try:
        run_loop(model, job, resolution, steps=4, repeats=0)
    finally:
        for handle in handles:
            handle.remove()
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def figures(name: str, device: torch.device) -> dict:
    """The figures of bench model `name` in fp16 on `device` (fp32 on a CPU, for a dry run of this script)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model = build_bench_model(name, torch.float16 if cuda else torch.float32)
    model.module.to(device)
    resolution = model.default_resolution
    resolution = tuple(int(p) for p in resolution.split("x")) if isinstance(resolution, str) else (resolution,) * 2
    job = job_for("cfg") if name in ("sd15", "sdxl") else job_for("ulysses")
    loop = run_loop(model, job, resolution, steps=10, repeats=2)
    return {"model": name, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "dtype": "fp16" if cuda else "fp32",
            "resolution": list(resolution), "images": job.images, "cfg": job.cfg,
            "seconds_per_call_median": statistics.median(loop.per_call),
            "end_to_end_seconds": loop.end_to_end,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
            "layer_ms": layer_profile(model, job, resolution, device)}


def main(names: list[str]) -> None:
    out = os.environ.get("OUT", "/tmp/tandem-gpu")
    os.makedirs(out, exist_ok=True)
    device = torch.device(os.environ.get("TANDEM_FIGURES_DEVICE", "cuda:0"))  # cpu: a dry run of the script
    for name in names:
        result = figures(name, device)
        with open(os.path.join(out, f"one-device-{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(f"{name}: {1000 * result['seconds_per_call_median']:.1f} ms per call on {result['device']} ({result['dtype']}, "
              f"{result['resolution'][0]}x{result['resolution'][1]}), peak {(result['peak_memory_bytes'] or 0) / 2**20:.0f} MiB, "
              f"{len(result['layer_ms'])} blocks profiled", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["sd15", "sdxl", "flux-small"])
