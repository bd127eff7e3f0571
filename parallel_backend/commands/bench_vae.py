"""`tandem bench --stage vae` (and `--stage encode`): a VAE decode (an encode) split into bands of rows, or a grid
of tiles on 4 or more devices, over the pool (engine/vae.py) against the same on one device, in one run: the serial decode in this process with one device's share of the cores,
the banded decode on the pool's workers, in rotation within every repeat so the machine's drift hits both alike.
A run whose repeats spread too far, or that other processes disturbed, is marked DISTURBED, as the sampler's."""

from __future__ import annotations

import statistics
import time

from .bench_inputs import parse_resolution
from .bench_load import SPREAD_LIMIT, _other_load, _spread, note_other_load

WAYS = {"vae": "decode", "encode": "encode"}  # --stage -> what the VAE does in it


def run_vae_bench(model_name: str = "sd15", devices: str = "cpu:2", resolution=None, repeats: int = 2,
                  progress=print, stage: str = "vae") -> dict:
    """stage: "vae" times the decode of a seeded latent, "encode" the encode of a seeded image."""
    import torch

    from ..engine import vae as split
    from ..engine.pool_engine import engine_for
    from ..models.benchmodels_vae import DEFAULT_RESOLUTION, VIDEO_FRAMES, bench_image, bench_latent, build_bench_vae
    from ..models.vae_families import family_of
    from ..models.vae_grid import label
    from ..runtime.pool import WorkerPool

    vae = build_bench_vae(model_name)
    resolution = parse_resolution(resolution or DEFAULT_RESOLUTION[model_name])
    encoding = stage == "encode"
    family = family_of(vae)
    inputs = bench_image(model_name, resolution) if encoding else bench_latent(model_name, resolution)
    whole, banded = (family.encode, split.encode) if encoding else (family.decode, split.decode)
    pool = WorkerPool(devices)
    other_load = _other_load()
    cores = torch.get_num_threads()
    disturbed = []
    try:
        pool.start()
        n = len(pool.devices)
        engine, share = engine_for(pool), max(1, cores // n)
        progress(f"[bench] VAE {WAYS[stage]} of {resolution[0]}x{resolution[1]} px ({tuple(inputs.shape)} "
                 f"{'image' if encoding else 'latent'}): one device here, split over {n} devices of the pool, "
                 "in rotation")
        serial_s, split_s, reference, done, serial_peak = rotate(vae, inputs, whole, banded, engine, repeats, share,
                                                                 disturbed)
        activations = [done.extra["activation_peak_bytes"][r] for r in sorted(done.extra["activation_peak_bytes"])]
        memory = pool.memory()
        rows = [
            {"strategy": "serial", "devices": 1, "seconds_median": statistics.median(serial_s),
             "speedup_vs_serial": 1.0, "max_abs_diff_vs_serial": 0.0, "activation_bytes_per_device": [serial_peak]},
            {"strategy": label(done.extra["grid"]), "devices": done.extra["bands"], "grid": list(done.extra["grid"]),
             "seconds_median": statistics.median(split_s),
             "speedup_vs_serial": statistics.median(serial_s) / statistics.median(split_s),
             "max_abs_diff_vs_serial": (done.out - reference).abs().max().item(),
             "output_scale": reference.abs().max().item(), "activation_bytes_per_device": activations,
             "peak_memory_bytes_per_device": memory,
             "bytes_between_devices": done.bytes_sent},
        ]
    finally:
        pool.shutdown()
        torch.set_num_threads(cores)
    load = note_other_load(other_load, disturbed)
    return {"stage": stage, "model": model_name, "resolution": list(resolution), "frames": VIDEO_FRAMES.get(model_name),
            "devices": list(pool.devices),
            "dtype": "fp32", "threads_per_device": share, "results": rows, "disturbed": disturbed,
            "other_load_share": load}


def rotate(vae, inputs, whole, banded, engine, repeats: int, share: int, disturbed: list, label: str = ""):
    """`whole(vae, inputs)` here with `share` threads and `banded(engine, vae, inputs)` on the pool, in turn,
    repeats + 1 times (the first of each warms up). Returns (serial seconds, banded seconds, the whole output, the
    last banded Computed, the serial run's peak bytes); repeats spread too far are noted in `disturbed`."""
    import torch

    from ..runtime.portable import peak_memory_bytes, reset_peak_memory

    serial_s, split_s = [], []
    threads = torch.get_num_threads()
    try:
        for _ in range(repeats + 1):
            torch.set_num_threads(share)
            reset_peak_memory("cpu")
            before = peak_memory_bytes("cpu")
            started = time.perf_counter()
            with torch.inference_mode():
                reference = whole(vae, inputs)
            serial_s.append(time.perf_counter() - started)
            serial_peak = peak_memory_bytes("cpu") - before
            torch.set_num_threads(1)  # the host only joins the rows: idle threads would spin on the workers' cores
            started = time.perf_counter()
            done = banded(engine, vae, inputs)
            split_s.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    serial_s, split_s = serial_s[1:] or serial_s, split_s[1:] or split_s
    for name, times in (("serial", serial_s), ("bands", split_s)):
        if _spread(times) > SPREAD_LIMIT:
            disturbed.append(f"{label}{name}: repeats spread {100 * _spread(times):.0f}% (> {100 * SPREAD_LIMIT:.0f}%)")
    return serial_s, split_s, reference, done, serial_peak


def decode_figures(engine, vae, model_name: str, resolution, images: int, frames, repeats: int, share: int,
                   disturbed: list) -> dict:
    """The sampler bench's decode (end to end includes it): `vae` (bench model `model_name`'s, build_bench_vae)
    decoding a seeded latent of `images` images at `resolution` (`frames` for a video) here and in bands on the
    pool, in turn."""
    from ..engine.vae import decode
    from ..models.benchmodels_vae import bench_latent
    from ..models.vae_families import family_of

    latent = bench_latent(model_name, resolution, frames=frames)
    latent = latent.expand(images, *latent.shape[1:])
    serial_s, split_s, reference, done, _ = rotate(vae, latent.contiguous(), family_of(vae).decode, decode, engine,
                                                   repeats, share, disturbed, "VAE decode, ")
    return {"serial_seconds": statistics.median(serial_s), "bands_seconds": statistics.median(split_s),
            "bands": done.extra["bands"], "max_abs_diff_vs_serial": (done.out - reference).abs().max().item()}


def format_vae_table(report: dict) -> str:
    h, w = report["resolution"]
    frames = f" x {report['frames']} frames" if report.get("frames") else ""
    lines = [f"VAE {WAYS[report['stage']]}, {report['model']} at {h}x{w} px{frames}, on {', '.join(report['devices'])} "
             f"({report['threads_per_device']} thread(s) per device)",
             f"{'':8} {'devices':>7} {'s':>8} {'speed-up':>9} {'act. MiB/dev':>13} {'max |diff|':>11}"]
    for row in report["results"]:
        act = "/".join(f"{b / 2**20:.0f}" for b in row["activation_bytes_per_device"])
        lines.append(f"{row['strategy']:8} {row['devices']:>7} {row['seconds_median']:>8.2f} "
                     f"{row['speedup_vs_serial']:>8.2f}x {act:>13} {row['max_abs_diff_vs_serial']:>11.2e}")
    bands = report["results"][-1]
    lines.append(f"{bands['strategy']}: {bands['bytes_between_devices'] / 2**20:.1f} MiB between devices per "
                 f"{WAYS[report['stage']]} (halos, norm statistics, the gathered attention input)")
    if report["disturbed"]:
        lines.append("DISTURBED RUN, figures unreliable: " + "; ".join(report["disturbed"]))
    return "\n".join(lines)
