"""The `tandem` command line: `tandem generate | bench | plan | demo | workflow run | worker serve`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..engine.config import (AUTO_KNOBS, DEVICE_SPEEDS, DEVICES, MEMORY_KNOBS, MEMORY_PER_DEVICE, TIMEOUT,
                              WEIGHTS_DTYPE, strategy_choices)
from ..models.request import SCHEDULERS
from ..runtime import validation
from ..runtime.knobs import add_options
from ..runtime.pool_settings import ALLOW_MISSING_MACHINES, INTERFACE, SECRET_FILE
from .arguments import (UsageError, bench_knobs, bench_strategies, check_bench_options, check_demo_options,
                        check_calibrate_options, check_environment, check_generate_options, check_gpu_plan_options,
                        check_machines,
                        check_plan_options, check_serve_options, check_workflow_options, knobs, machine_settings,
                        memory_settings, request_for, strategy_knobs)

# Argument checks (arguments.py) come before every heavy import: torch, diffusers and gradio load inside the
# commands, once their arguments have passed.


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + traceback-like noise
        raise UsageError(f"{self.prog}: {message} (see --help)")


def plural(count: int, noun: str) -> str:
    """"1 device", "2 devices": a count as a summary line says it."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def parallel_config(args):
    """The ParallelConfig the options ask for, or None for plain one-device sampling."""
    if args.devices is None:
        return None
    from ..engine.config import ParallelConfig

    return ParallelConfig(args.devices, args.strategy, timeout_s=args.timeout, device_speeds=args.device_speeds,
                          **memory_settings(args), **machine_settings(args), **strategy_knobs(args))


def explain(config, steps: int, guided: bool = True) -> str:
    """What each device does at each call under `config`, in the strategy's own words, for --explain."""
    from .. import strategies
    from ..engine.mesh import resolve
    from ..runtime.devices import resolve_devices

    devices = list(resolve_devices(config.device_list))
    mesh = resolve(config, len(devices), 2 if guided else 1)
    return strategies.get(mesh.strategy).explain(mesh, config, steps, devices)


def grid(images: list):
    """Images side by side in one picture."""
    from PIL import Image

    canvas = Image.new(images[0].mode, (sum(im.width for im in images), max(im.height for im in images)))
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width
    return canvas


def check_split(config, devices: int, cfg: float):
    """The mesh `config` gives a job at `cfg` on `devices` devices; says in one line when the job runs on one
    device, with nothing split. Starts nothing."""
    from ..engine.mesh import check_job

    mesh = check_job(config, devices, cfg != 1.0)
    if mesh.size == 1:
        print(f"tandem: warning: {mesh.describe()} runs the whole model on one device: nothing is split "
              "(give two devices or more)", file=sys.stderr)
    return mesh


def cmd_generate(args) -> int:
    from ..runtime.devices import resolve_devices

    request = check_generate_options(args)
    out = Path(args.out)
    config = parallel_config(args)
    if args.explain and config is None:
        raise UsageError("--explain needs --devices (and --strategy)")
    devices = len(resolve_devices(config.device_list)) if config is not None else 1  # they exist; none started
    if config is not None and args.cfg is not None:
        check_split(config, devices, args.cfg)  # before the model loads or a pool starts
    if args.explain:
        print(explain(config, args.steps, args.cfg != 1.0))
        return 0
    check_machines(args)  # the other machines' settings, and that they answer: before the model loads
    from ..hosts.pipelines import load_pipeline
    from ..models.sampling import Timer

    with Timer() as load_timer:
        pipeline = load_pipeline(args.model, args.device)
    if args.cfg is None:
        request = request_for(args, pipeline.default_cfg)
        if config is not None:
            check_split(config, devices, request.cfg)
    pipeline.check(request)  # memory: before any step, and before a pool starts
    if config is None:
        result = pipeline.generate(request, progress=not args.quiet)
    else:
        with pipeline.parallel(config) as parallel_pipeline:
            result = parallel_pipeline.generate(request, progress=not args.quiet)
    image = result.images[0] if len(result.images) == 1 else grid(result.images)
    try:  # checked before the work, but the disk may have filled or the folder gone since
        image.save(out)
    except OSError as exc:
        raise OSError(f"could not write {out}: {exc}") from None
    per_call = 1000 * result.seconds / max(result.model_calls, 1)
    where = (f"with {config.strategy} on {plural(len(result.extras['devices']), 'device')}" if config
             else f"on {pipeline.device}")
    print(f"tandem: {plural(len(result.images), 'image')}, {request.steps} steps ({request.scheduler}, cfg "
          f"{request.cfg:g}) in {result.seconds:.2f} s {where} ({per_call:.1f} ms per model call, "
          f"{result.model_calls} calls; model loaded in {load_timer.seconds:.2f} s) -> {out}")
    return 0


def cmd_bench(args) -> int:
    if args.stage in ("vae", "encode"):
        return _bench_vae(args)
    check_bench_options(args)  # the bench checks again, after torch has loaded; these came first
    check_machines(args)
    from .bench import format_table, run_bench

    report = run_bench(args.model, args.devices, bench_strategies(args), args.steps, args.resolution, args.repeats,
                       args.dtype, knobs=bench_knobs(args), frames=args.frames, cfg=args.cfg, images=args.images,
                       balance=args.balance, test_slowdown=args.test_slowdown, plan=not args.no_plan,
                       decode=not args.no_decode,
                       progress=_progress(args))
    return _report(args, format_table(report), report)


def _progress(args):
    return (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr))


def _report(args, table: str, report: dict) -> int:
    """Prints a bench's table and writes its JSON where --json asks."""
    print(table)
    if args.json:
        validation.write_json("--json", args.json, report, default=float)
        print(f"tandem: wrote {args.json}")
    return 0


def _bench_vae(args) -> int:
    """`tandem bench --stage vae` (`encode`): the bench model's VAE decode (encode), one device against bands on
    the pool."""
    from ..models.benchmodels_vae import check_vae_bench
    from ..runtime.devices import check_devices_exist, parse_devices
    from .bench_inputs import MAX_REPEATS, parse_resolution

    resolution = parse_resolution(args.resolution) if args.resolution is not None else None
    check_vae_bench(args.model, resolution, args.stage)
    repeats = validation.whole_number("repeats", args.repeats, 0, MAX_REPEATS)
    check_devices_exist(parse_devices(args.devices)) if args.devices != "auto" else None
    if args.json is not None:
        validation.writable_file("--json", args.json)  # before the bench, not after it
    from .bench_vae import format_vae_table, run_vae_bench

    report = run_vae_bench(args.model, args.devices, args.resolution, repeats, progress=_progress(args),
                           stage=args.stage)
    return _report(args, format_vae_table(report), report)


def cmd_plan(args) -> int:
    if args.calibrate:
        return cmd_plan_calibrate(args)
    if args.gpu is not None:
        return cmd_plan_gpu(args)
    link, cfg, resolution, devices = check_plan_options(args)
    if link is None:  # a pool starts to measure the link
        check_machines(args)
    from .bench import DTYPES, parse_resolution
    from ..models.benchmodels import build_bench_model
    from ..plan import report
    from ..plan.calibrate import HOST_OVERHEAD_S
    from ..engine.weights import default_budget_bytes
    from ..plan.choose import NothingFits, choose
    from ..plan.measure import measure_inputs
    from ..plan.model import candidates
    from ..plan.probe import probe_devices

    kind = "cpu" if devices[0] == "cpu" else "cuda"
    model = build_bench_model(args.model, DTYPES["fp32" if kind == "cpu" else "fp16"], args.frames)  # as the bench
    resolution = resolution or parse_resolution(model.default_resolution)
    model.check_resolution(resolution)
    branches = 2 if cfg != 1.0 else 1
    validation.fits_in_memory(f"resolution {resolution[0]}x{resolution[1]} for model {model.name}",
                              model.memory_bytes(branches, resolution), devices[0], "choose a smaller --resolution")
    model.module.to(devices[0])
    figures = probe_devices(args.devices, model, resolution, branches, **machine_settings(args)) if link is None \
        else None
    inputs = measure_inputs(model, resolution, branches, branches, link or figures.link, len(devices), args.steps)
    if figures is not None:
        inputs = figures.apply(inputs)
    no_decode = ""
    if kind == "cpu":  # end to end includes the VAE decode, in bands on the pool
        from ..plan.vae_count import decode_end_to_end

        decode = decode_end_to_end(args.model, resolution, model.frames, list(devices), inputs.link,
                                   inputs.host_overhead_s, inputs.contention)
        if decode is not None:
            inputs = dataclasses.replace(inputs, decode_seconds=decode[0], decode_split_seconds=decode[1])
        else:
            no_decode = (f"end to end without the VAE decode: {model.name}'s latent at this size cannot be cut "
                         f"into {len(devices)} bands (or it has no bench VAE)")
    budget = (int(args.memory_per_device * 2**30) if args.memory_per_device is not None
              else default_budget_bytes(list(devices)))
    if args.memory_per_device is not None:  # pipefusion cuts its stages' weights within it
        inputs = dataclasses.replace(inputs, stage_cap_bytes=budget)
    found = candidates(inputs, len(devices), budget)
    try:
        choice, nothing_fits = choose(found), ""
    except NothingFits as exc:
        choice, nothing_fits = None, str(exc)
    clip = f" x {model.frames} frames" if model.frames else ""
    print(f"tandem plan (a prediction of the cost model, not a measurement): model {model.name}, "
          f"{resolution[0]}x{resolution[1]} px{clip}, 1 image at cfg {cfg:g}, {plural(len(devices), 'device')} "
          f"({','.join(devices)}), link {inputs.link.name} ({inputs.link.source})")
    print(report.inputs_line(inputs, "measured on the pool" if figures else HOST_OVERHEAD_S[kind][1]))
    if no_decode:
        print(no_decode)
    print(f"memory per device: {budget / 2**30:.3f} GiB" + ("" if args.memory_per_device is not None else
          " (what the devices have free)") if budget is not None else "memory per device: not known (not checked)")
    print(report.format_table(found, choice, nothing_fits))
    vae = None
    if args.vae:
        from ..plan.vae_count import plan_vae_line

        line, vae = plan_vae_line(args.model, resolution, model.frames, list(devices), inputs.link,
                                  inputs.host_overhead_s, inputs.contention)
        print(line)
    if args.json:
        header = {"model": model.name, "resolution": list(resolution), "frames": model.frames, "cfg": cfg,
                  "devices": list(devices), "memory_per_device_bytes": budget}
        written = report.as_json(header, inputs, found, choice, nothing_fits)
        validation.write_json("--json", args.json, written if vae is None else {**written, "vae_decode": vae})
        print(f"tandem: wrote {args.json}")
    if choice is None:
        print(f"tandem: {nothing_fits}", file=sys.stderr)
        return 1
    return 0


def cmd_plan_gpu(args) -> int:
    """`tandem plan --gpu NAME --gpus N`: a full-size model counted on the meta device, predicted on named GPUs with
    the constants fitted to published measurements (plan/fitted.py); nothing runs on a device."""
    name, gpu, gpus, link, cfg, resolution, frames, calibration = check_gpu_plan_options(args)
    from ..plan import report
    from ..plan.choose import NothingFits, choose
    from ..plan.fitted import FITTED
    from ..plan.gpu_calibration import constants_for, describe
    from ..plan.paper import gpu_plan, paper_model_named

    job = paper_model_named(name)
    resolution, frames = resolution or job.resolution, frames or job.frames
    branches = 2 if cfg != 1.0 else 1
    constants, measured_link = constants_for(calibration, gpu.peak_flops) if calibration else (FITTED, None)
    inputs, found, card, decode = gpu_plan(name, gpu.name, gpus, link or measured_link, resolution, frames,
                                           args.steps, branches, args.weights_dtype, constants)
    budget = (int(args.memory_per_device * 2**30) if args.memory_per_device is not None else card.memory_bytes)
    found = [dataclasses.replace(c, fits=c.memory_bytes_per_device <= budget) for c in found]
    try:
        choice, nothing_fits = choose(found), ""
    except NothingFits as exc:
        choice, nothing_fits = None, str(exc)
    clip = f" x {frames} frames" if frames else ""
    print(f"tandem plan (a prediction on paper, not a measurement): model {name}, {resolution[0]}x{resolution[1]} "
          f"px{clip}, cfg {cfg:g}, "
          f"{args.steps} steps, weights {args.weights_dtype}, {plural(gpus, 'GPU')} {card.name} ({card.source}), "
          f"link {inputs.link.name} ({inputs.link.source}); "
          + (f"constants from {args.constants}, {describe(calibration)}" if calibration else
             "constants fitted to published measurements (plan/fitted.py)"))
    print(report.inputs_line(inputs, "fitted split cost"))
    print(decode.line())
    print(f"memory per device: {budget / 2**30:.3f} GiB")
    print(report.format_table(found, choice, nothing_fits))
    if choice is not None and not choice.best.exact:
        print(f"auto (exact strategies only: it promises one device's output): "
              f"{choose(found, exact_only=True).reason}")
    if args.json:
        header = {"model": name, "resolution": list(resolution), "frames": frames, "cfg": cfg,
                  "steps": args.steps, "gpu": card.name, "gpus": gpus, "memory_per_device_bytes": budget,
                  "weights_dtype": args.weights_dtype, "constants": args.constants or "fitted"}
        written = {**report.as_json(header, inputs, found, choice, nothing_fits), "end_to_end": decode.as_json()}
        if choice is not None:  # auto promises one device's output: its choice is among the exact strategies
            written["auto"] = report.as_json({}, inputs, found, choose(found, exact_only=True))["choice"]
        validation.write_json("--json", args.json, written)
        print(f"tandem: wrote {args.json}")
    if choice is None:
        print(f"tandem: {nothing_fits}", file=sys.stderr)
        return 1
    return 0


def cmd_plan_calibrate(args) -> int:
    """`tandem plan --calibrate --devices D --out FILE`: the GPU model's figures measured on the devices
    (plan/gpu_calibration.py), for `tandem plan --gpu NAME --constants FILE`."""
    devices = check_calibrate_options(args)
    from ..plan.gpu_calibration import calibrate, describe

    print(f"tandem plan --calibrate: measuring on {', '.join(devices)} (a minute or so)", flush=True)
    figures = calibrate(devices)
    validation.write_json("--out", args.out, figures)
    print(describe(figures))
    print(f"tandem: wrote {args.out}; use it with tandem plan --gpu NAME --constants {args.out}")
    return 0


def cmd_demo(args) -> int:
    check_demo_options(args)  # before gradio loads
    try:
        from ..demo.app import serve
    except ImportError as exc:
        raise UsageError(f"tandem demo needs gradio: pip install 'comfyui-tandem[demo]' ({exc})") from None
    serve(args.host, args.port, args.model)
    return 0


class _NodeBars:
    """One tqdm bar per node that reports progress, as ComfyUI's websocket reports it."""

    def __init__(self, quiet: bool):
        from tqdm.auto import tqdm

        self.tqdm, self.quiet, self.bars = tqdm, quiet, {}

    def __call__(self, node, value, total) -> None:
        bar = self.bars.get(node)
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = self.bars[node] = self.tqdm(total=total, desc=f"node {node}", unit="step", leave=False,
                                              disable=self.quiet)
        bar.n = value
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars = {}


def cmd_workflow_run(args) -> int:
    from .workflow import run_workflow

    check_workflow_options(args)
    bars = _NodeBars(args.quiet)
    files = run_workflow(args.file, args.server, args.set, args.out, args.timeout, bars)
    bars.close()
    print(f"tandem: workflow finished; {plural(len(files), 'output file')} in {args.out}")
    for path in files:
        print(f"  {path}")
    return 0


def cmd_workflow_compare(args) -> int:
    from .workflow_compare import compare_workflows

    check_workflow_options(args)
    bars = _NodeBars(args.quiet)

    def say(line: str) -> None:
        bars.close()
        if not args.quiet:
            print(f"tandem: {line}", file=sys.stderr)

    result = compare_workflows(args.file, args.server, args.set, args.against, args.repeats, args.out, args.timeout,
                               bars, say)
    bars.close()
    baseline = "the other workflow" if args.against else "its stock twin"
    print(f"workflow {args.file} vs {baseline} on {args.server}: {plural(args.repeats, 'timed run')} each after a warm-up; "
          "seconds are ComfyUI's execution time")
    print(result.table())
    if args.json:
        validation.write_json("--json", args.json, result.as_json())
        print(f"tandem: wrote {args.json}")
    return 0


def cmd_worker_serve(args) -> int:
    check_serve_options(args)  # before torch loads
    from ..runtime import serve

    return serve.main(args.listen, args.devices, args.secret_file, args.interface, args.comfyui, args.cache_dir,
                      args.cache_size)


def _add_machine_options(parser):
    """A host's settings for devices on other machines (HOST:PORT/DEVICE), passed to the pool as arguments."""
    add_options(parser, (SECRET_FILE, INTERFACE, ALLOW_MISSING_MACHINES))


def _add_parallel_options(parser, devices_default):
    parser.add_argument("--devices", default=devices_default, help=DEVICES.help)
    _add_machine_options(parser)
    parser.add_argument("--strategy", default="auto", help=f"one of: {', '.join(strategy_choices())}")
    parser.add_argument("--timeout", type=float, default=TIMEOUT.default, help=TIMEOUT.help)
    _add_knob_options(parser)


def _add_knob_options(parser):
    """An option per strategy knob (`strategies.knobs()`), --device-speeds, --weights, --memory-per-device and
    --allow-stale."""
    add_options(parser, (*knobs(), DEVICE_SPEEDS, *MEMORY_KNOBS, *AUTO_KNOBS))


def build_parser() -> argparse.ArgumentParser:
    from ..plan.links import PROBE, PROFILES

    parser = _Parser(prog="tandem", description="Tandem: multi-device diffusion sampling.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = commands.add_parser("generate", help="text to image with the embedded digits model or a diffusers folder")
    gen.add_argument("--prompt", default="a handwritten 7")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--steps", type=int, default=25, help="sampler steps, 1 to 10000")
    gen.add_argument("--cfg", type=float, default=None, help="guidance scale from 0 to 100 (default: the model's; 1 disables)")
    gen.add_argument("--seed", type=int, default=0, help="0 to 2**63 - 1")
    gen.add_argument("--scheduler", default="euler", help=f"one of: {', '.join(SCHEDULERS)}")
    gen.add_argument("--num-images", type=int, default=1, help="images of the prompt, saved side by side: 1 to 10000, and what memory holds")
    gen.add_argument("--out", default="tandem.png", help="image file to write")
    gen.add_argument("--model", default=None,
                     help="a local diffusers Stable Diffusion / SDXL folder (default: the embedded digits model)")
    gen.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("--explain", action="store_true", help="print what each device does at each step, then exit")
    _add_parallel_options(gen, devices_default=None)
    gen.set_defaults(run=cmd_generate)

    bench = commands.add_parser("bench", help="one device vs each strategy, same model and inputs, one run")
    bench.add_argument("--model", default="small",
                       help="tiny, small, sd15, sdxl (UNets), flux-small or wan-small (narrow diffusers Flux / Wan "
                            "transformers: random weights, real block structure and token counts)")
    bench.add_argument("--devices", default="cpu:2", help="'cuda:0,cuda:1', 'cpu:2' or 'auto' (HOST:PORT/DEVICE: "
                       "another machine's)")
    _add_machine_options(bench)
    bench.add_argument("--stage", default="sampler", choices=("sampler", "vae", "encode"),
                       help="sampler: the denoising loop, one device against each strategy; vae: the model's VAE decode, "
                            "one device against bands of rows on the pool (--model tiny, small, sd15, sdxl, flux-small or "
                            "wan-small: 17 frames; --devices, --resolution, --repeats and --json apply); encode: the "
                            "same VAE's encode of a seeded image")
    bench.add_argument("--strategies", "--strategy", default="cfg,batch",
                       help=f"comma list of strategies: {', '.join(strategy_choices()[1:])}")
    bench.add_argument("--steps", type=int, default=20, help="sampler calls per run, 1 to 10000")
    bench.add_argument("--resolution", default=None,
                       help="pixels: 256 or 1024x768 (H x W), a multiple of the model's latent size (16 for flux-small "
                            "and wan-small), at most 16384 and what memory holds (default: the model's)")
    bench.add_argument("--frames", type=int, default=None,
                       help="video models (wan-small) only: frames per clip, 4k + 1 (default: 17)")
    bench.add_argument("--cfg", type=float, default=None,
                       help="guidance scale of every job, 1 to 100 (1: no uncond branch; default: 7.5 for the strategies "
                            "that split branches, else 1)")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs of each loop (after one warm-up), 0 to 1000")
    bench.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16")
    bench.add_argument("--json", default=None, help="also write the report as JSON here")
    bench.add_argument("--images", type=int, default=None, help="images per job, 1 to 64 (default: each strategy's own)")
    bench.add_argument("--balance", default=None, choices=("equal", "balanced", "both"),
                       help="mixed devices: run each strategy with equal shares, shares sized by measured speed, or "
                            "both (rows 'batch (equal)', 'batch (balanced)'; ideal: the sum of the speeds)")
    bench.add_argument("--test-slowdown", default=None,
                       help="proofs on CPU only: RANK:FACTOR, e.g. 1:2 makes worker 1 repeat its compute twice, a "
                            "stand-in for a slower card (factor 1 to 10)")
    bench.add_argument("--no-plan", action="store_true",
                       help="leave out the plan's prediction and its measurements (about 10 s): the plan column stays "
                            "blank")
    bench.add_argument("--no-decode", action="store_true",
                       help="leave out the VAE decode that end to end includes (the bench model's VAE, here for serial, "
                            "in bands on the pool for the strategies)")
    _add_knob_options(bench)
    bench.add_argument("--quiet", action="store_true")
    bench.set_defaults(run=cmd_bench)

    plan = commands.add_parser("plan", help="predict each strategy's speed-up on these devices (a cost model fed "
                                            "with one-device measurements taken here) and choose")
    plan.add_argument("--model", default="small", help="a bench model: tiny, small, sd15, sdxl, flux-small, wan-small; "
                      "with --gpu a full-size model: sdxl, sd3.5-large, flux-dev, flux2-dev, qwen-image, wan-14b, "
                      "hunyuanvideo, ltx-video")
    plan.add_argument("--gpu", default=None, help="predict on paper for named GPUs instead of the devices given: "
                      "rtx3090, rtx4090, rtx5090, l20, l40, a100, h100, h200, h800, b200, ... (no device needed)")
    plan.add_argument("--gpus", type=int, default=2, help="with --gpu: how many of them")
    plan.add_argument("--devices", default="cpu:2", help="'cuda:0,cuda:1', 'cpu:2' or 'auto' (HOST:PORT/DEVICE: "
                      "another machine's)")
    _add_machine_options(plan)
    add_options(plan, (MEMORY_PER_DEVICE, WEIGHTS_DTYPE))
    plan.add_argument("--link", default=PROBE, help=f"{PROBE} (default: start workers on the devices and measure "
                                                    f"their link and contention; with --gpu: that GPU's usual link), or a named link: "
                                                    f"{', '.join(PROFILES)}")
    plan.add_argument("--cfg", type=float, default=7.5, help="guidance scale, 1 to 100 (1: no uncond branch)")
    plan.add_argument("--resolution", default=None, help="pixels: 256 or 1024x768 (default: the model's)")
    plan.add_argument("--frames", type=int, default=None, help="video models (wan-small) only: frames per clip, 4k + 1")
    plan.add_argument("--steps", type=int, default=20, help="sampler calls of the run the end-to-end figure is for")
    plan.add_argument("--json", default=None, help="also write the candidates and the choice as JSON here")
    plan.add_argument("--vae", action="store_true", help="also predict the bench model's VAE decode in bands of rows "
                      "on the devices, from one decode timed on the first (minutes for wan-small on a CPU)")
    plan.add_argument("--calibrate", action="store_true", help="measure the GPU model's figures on --devices (the "
                      "time per kernel launched, the compute rate by work per device, the link) and write them to "
                      "--out")
    plan.add_argument("--out", default=None, help="with --calibrate: the JSON file to write")
    plan.add_argument("--constants", default=None, help="with --gpu: a file of --calibrate, measured on that card, "
                      "in place of the constants fitted to published measurements")
    plan.set_defaults(run=cmd_plan)

    demo = commands.add_parser("demo", help="a local Gradio app: one device vs Tandem side by side, bench, pool")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--model", default=None,
                      help="a local diffusers Stable Diffusion / SDXL folder (default: the embedded digits model)")
    demo.set_defaults(run=cmd_demo)

    workflow = commands.add_parser("workflow", help="run API-format workflows on a running ComfyUI")
    actions = workflow.add_subparsers(dest="action", required=True, parser_class=_Parser)
    run = actions.add_parser("run", help="submit a workflow, follow its progress, download its outputs")
    run.add_argument("file", help="API-format workflow JSON (ComfyUI: Workflow > Export (API))")
    run.add_argument("--server", default="http://127.0.0.1:8188")
    run.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                     help="override an input, e.g. --set 3.seed=7 (node id, title or class_type)")
    run.add_argument("--out", default="tandem-outputs", help="folder for the downloaded outputs")
    run.add_argument("--timeout", type=float, default=3600.0, help="longest silence from the server, seconds")
    run.add_argument("--quiet", action="store_true")
    run.set_defaults(run=cmd_workflow_run)
    compare = actions.add_parser("compare", help="time a workflow against its stock twin (Multi-GPU nodes swapped "
                                                 "for stock ones) or another workflow; compare their outputs")
    compare.add_argument("file", help="API-format workflow JSON with Multi-GPU nodes")
    compare.add_argument("--server", default="http://127.0.0.1:8188")
    compare.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                         help="override an input of FILE before its stock twin is derived")
    compare.add_argument("--against", default=None, metavar="OTHER.json",
                         help="compare with this workflow instead of the stock twin (e.g. another multi-GPU node)")
    compare.add_argument("--repeats", type=int, default=2, help="timed runs of each, after one warm-up run each")
    compare.add_argument("--out", default="tandem-compare", help="folder for both variants' last outputs")
    compare.add_argument("--json", default=None, help="also write the figures to this JSON file")
    compare.add_argument("--timeout", type=float, default=3600.0, help="longest silence from the server, seconds")
    compare.add_argument("--quiet", action="store_true")
    compare.set_defaults(run=cmd_workflow_compare)

    worker = commands.add_parser("worker", help="this machine's devices for a host's pool on another machine")
    worker_actions = worker.add_subparsers(dest="action", required=True)
    serve = worker_actions.add_parser("serve", help="keep workers ready for one host at a time (docs/multi-machine.md)")
    serve.add_argument("--listen", required=True, help="ADDRESS:PORT or NAME:PORT to listen on (a name is resolved to "
                       "its IPv4 address): the address of the interface the pool's machines share, the only one used "
                       "(0.0.0.0, every interface, only with --interface)")
    serve.add_argument("--devices", default="auto", help="this machine's devices: 'cuda:0,cuda:1', 'cpu:2' or 'auto'")
    serve.add_argument("--secret-file", required=True, help="the shared secret (at least 16 bytes; e.g. `openssl "
                       "rand -hex 32 > FILE`), the same file on every machine; its TLS certificate is kept beside it")
    serve.add_argument("--interface", default=None, help="the interface gloo/NCCL bind to (default: the one that "
                       "holds the --listen address; needed with --listen 0.0.0.0:PORT)")
    serve.add_argument("--comfyui", default=None, help="ComfyUI's root folder, for hosts that run ComfyUI (its "
                       "version must match the host's)")
    serve.add_argument("--cache-dir", default=None, help="where the models hosts send are kept, named by a hash of "
                       "their weights, so each crosses the network once (default: ~/.cache/tandem/weights)")
    serve.add_argument("--cache-size", default=50.0, help="the weights cache's bound in GiB (default 50): the least "
                       "recently used models are removed to stay within it; it must hold the largest model")
    serve.set_defaults(run=cmd_worker_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        check_environment()
        return args.run(args)
    except UsageError as exc:
        print(f"tandem: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as exc:  # WorkflowError and WorkerError are RuntimeErrors
        print(f"tandem: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tandem: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
