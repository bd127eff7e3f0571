"""The checks of `tandem`'s arguments, run before any heavy import: nothing here imports torch, diffusers or gradio,
so a wrong argument, file, address or TANDEM_* variable is refused in one sentence naming it, in well under a
second. The commands (cli.py) run these first, then import what their work needs."""

from __future__ import annotations

from ..engine.config import MEMORY_PER_DEVICE, WEIGHTS_DTYPE
from ..models.request import GenerationRequest
from ..runtime import validation

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


def knobs():
    from .. import strategies

    return strategies.knobs()


def strategy_knobs(args) -> dict:
    """The strategy knobs given on the command line, by name (unset ones left to the strategy)."""
    return {knob.name: getattr(args, knob.name) for knob in knobs()}


def axes() -> list:
    """The knobs that are mesh axes' degrees (they split the work, so they need --devices)."""
    return [knob for knob in knobs() if knob.axis]


def memory_settings(args) -> dict:
    """--weights, --memory-per-device and --allow-stale."""
    return {"weights": args.weights, "memory_per_device": args.memory_per_device, "allow_stale": args.allow_stale}


def machine_settings(args) -> dict:
    """--secret-file, --interface and --allow-missing-machines, for a pool with devices of other machines (None: the
    environment's)."""
    return {"secret_file": args.secret_file, "interface": args.interface,
            "allow_missing_machines": args.allow_missing_machines}


def check_machines(args) -> None:
    """Devices on other machines (--devices), before any model loads: --secret-file and --interface, given or from
    TANDEM_* (runtime/addresses.py: no torch), then, unless --allow-missing-machines, that each machine's `tandem
    worker serve` answers and takes the secret, as a pool's first start requires (remote.check_answers, which
    imports torch and loads nothing)."""
    from ..runtime import environment
    from ..runtime.devices import parse_devices, remote_machines
    from ..runtime.pool_settings import ALLOW_MISSING_MACHINES

    machines = remote_machines(parse_devices(args.devices)) if args.devices is not None else ()
    if not machines:
        return
    from ..runtime.addresses import host_settings

    secret = host_settings(machines, args.secret_file, args.interface)[2]
    if not environment.setting(ALLOW_MISSING_MACHINES, args.allow_missing_machines):
        from ..runtime.remote import check_answers

        check_answers(machines, secret)


def check_serve_options(args) -> None:
    """`tandem worker serve`'s --listen (a name resolved to its IPv4 address) and the interface its workers use
    (--interface, needed with 0.0.0.0), before torch loads (runtime/addresses.py)."""
    from ..runtime.addresses import listen_address, serve_interface

    serve_interface(*listen_address(args.listen), args.interface)


def bench_knobs(args) -> dict:
    """What `tandem bench` hands run_bench as its knobs: the strategies', the speeds, memory and machine settings."""
    return {**strategy_knobs(args), "device_speeds": args.device_speeds, **memory_settings(args),
            **machine_settings(args)}


def check_environment() -> None:
    """Every TANDEM_* variable, checked with the arguments (runtime/pool_settings.py)."""
    from ..runtime.pool_settings import check_environment as check

    check()


def check_model_folder(model) -> None:
    """A --model folder: a supported, readable diffusers pipeline (no weights loaded)."""
    if model is not None:
        from ..hosts.model_folder import pipeline_class_name

        pipeline_class_name(model)


def check_generate_options(args) -> GenerationRequest:
    """Every option of `tandem generate` that can be checked before the model loads; the request they make
    (cfg 1 stands in for the model's default until it is known)."""
    validation.writable_file("--out", args.out, IMAGE_SUFFIXES, "an image file")
    if args.device is not None:
        validation.torch_device("--device", args.device)
    validation.seconds("--timeout", args.timeout)
    given = strategy_knobs(args)
    if args.devices is None and (args.strategy != "auto" or any(given[axis.name] is not None for axis in axes())):
        options = ["--strategy", *(axis.option for axis in axes())]
        raise UsageError(f"{', '.join(options[:-1])} and {options[-1]} split the work over --devices: give "
                         "--devices too (e.g. cpu:2)")
    check_model_folder(args.model)
    return request_for(args, args.cfg if args.cfg is not None else 1.0)


def request_for(args, cfg: float) -> GenerationRequest:
    return GenerationRequest(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, cfg=cfg,
                             seed=args.seed, scheduler=args.scheduler, num_images=args.num_images)


def check_bench_options(args):
    """Every option of `tandem bench` that can be checked before the model is built (bench_inputs.py)."""
    from .bench_inputs import check_bench_inputs

    if args.json is not None:
        validation.writable_file("--json", args.json)  # before the bench, not after it
    return check_bench_inputs(args.model, args.devices, bench_strategies(args), args.steps, args.resolution,
                              args.repeats, args.dtype, bench_knobs(args), args.frames, args.cfg, args.images,
                              args.balance, args.test_slowdown)


def bench_strategies(args) -> tuple:
    return tuple(s.strip() for s in args.strategies.split(",") if s.strip())


def check_plan_options(args) -> tuple:
    """Every option of `tandem plan`, before the model is built: (link or None to measure it, cfg, resolution or
    None, devices)."""
    from .bench_inputs import parse_resolution
    from ..models.bench_names import check_bench_model_name, check_still_images
    from ..plan.links import CPU_DEFAULT, CUDA_DEFAULT, PROBE, link_named
    from ..runtime.devices import parse_devices, resolve_devices

    for given, option in ((args.constants, "--constants"), (args.weights_dtype != WEIGHTS_DTYPE.default,
                                                            "--weights-dtype"), (args.out, "--out")):
        if given:
            raise ValueError(f"{option} is for {'--calibrate' if option == '--out' else '--gpu'}: a plan on the "
                             "devices measures the model's own call")
    check_bench_model_name(args.model)
    check_still_images(args.model, args.frames)
    link = link_named(args.link) if args.link not in (None, PROBE) else None
    cfg = validation.finite_number("cfg", args.cfg, 1.0, validation.MAX_CFG)
    resolution = parse_resolution(args.resolution) if args.resolution is not None else None
    validation.whole_number("steps", args.steps, 1, validation.MAX_STEPS)
    if args.json is not None:
        validation.writable_file("--json", args.json)
    if args.memory_per_device is not None:
        MEMORY_PER_DEVICE.validate(args.memory_per_device)
    devices = resolve_devices(parse_devices(args.devices))  # they exist; nothing started
    if link is None and len(devices) < 2:  # nothing to probe: the commonest link, said in the output
        link = link_named(CPU_DEFAULT if devices[0] == "cpu" else CUDA_DEFAULT)
    return link, cfg, resolution, devices


def check_calibrate_options(args) -> list[str]:
    """`tandem plan --calibrate`'s options: the devices (resolved; they exist, nothing started) and --out."""
    from ..runtime.devices import parse_devices, resolve_devices

    if args.gpu is not None or args.constants is not None:
        raise ValueError("--calibrate measures the devices given (--devices): leave out --gpu and --constants")
    if args.out is None:
        raise ValueError("--calibrate needs --out FILE: the JSON file its figures go to")
    validation.writable_file("--out", args.out)
    devices = resolve_devices(parse_devices(args.devices))
    if devices[0] not in ("cpu",) and not devices[0].startswith("cuda"):
        raise ValueError(f"--calibrate measures CPU or CUDA devices on this machine; got {devices[0]}")
    return list(devices)


def check_gpu_plan_options(args) -> tuple:
    """`tandem plan --gpu`'s options, before anything is counted: (the paper model, the GPU, how many, the link or
    None for the GPU's usual one (or the calibration's), cfg, resolution or None, frames or None, the --constants
    file's figures or None). --devices and a measured link make no sense without devices."""
    from .bench_inputs import parse_resolution
    from ..plan.links import PROBE, link_named
    from ..plan.paper import gpu_for, paper_model_named

    model, gpu = paper_model_named(args.model), gpu_for(args.gpu)
    gpus = validation.whole_number("--gpus", args.gpus, 1, 64)
    if args.devices != "cpu:2":
        raise ValueError("--gpu predicts named GPUs on paper: leave out --devices (or leave out --gpu to plan for "
                         "the devices given)")
    if args.vae:
        raise ValueError("--vae times a decode on the devices: leave it out with --gpu, whose end to end already "
                         "counts the model's VAE decode on paper")
    link = None if args.link in (None, PROBE) else link_named(args.link).name
    cfg = validation.finite_number("cfg", args.cfg, 1.0, validation.MAX_CFG)
    resolution = parse_resolution(args.resolution) if args.resolution is not None else None
    frames = None
    if args.frames is not None:
        frames = validation.whole_number("--frames", args.frames, 1, 1024)
        if model.frames is None:
            raise ValueError(f"{args.model} makes images: --frames is for video models")
        k = model.frames_per_latent
        if (frames - 1) % k:
            raise ValueError(f"--frames {frames}: {args.model}'s clip has {k}k + 1 frames (e.g. "
                             f"{', '.join(str(k * n + 1) for n in (4, 10, 16))})")
    validation.whole_number("steps", args.steps, 1, validation.MAX_STEPS)
    if args.json is not None:
        validation.writable_file("--json", args.json)
    if args.memory_per_device is not None:
        MEMORY_PER_DEVICE.validate(args.memory_per_device)
    WEIGHTS_DTYPE.validate(args.weights_dtype)
    if args.out is not None:
        raise ValueError("--out is for --calibrate; with --gpu, --json writes the candidates")
    calibration = None
    if args.constants is not None:
        from ..plan.gpu_calibration import load

        calibration = load(args.constants)
    return args.model, gpu, gpus, link, cfg, resolution, frames, calibration


def check_demo_options(args) -> None:
    """`tandem demo`'s address and model folder, before gradio loads."""
    validation.listen_host("--host", args.host)
    validation.whole_number("--port", args.port, 1, 65535)
    check_model_folder(args.model)


def check_workflow_options(args) -> None:
    """The options `tandem workflow run | compare` share, and the workflow files and --set values, before the
    server is contacted."""
    from .workflow import load_workflow, parse_setting

    validation.seconds("--timeout", args.timeout)
    validation.http_url("--server", args.server)
    validation.creatable_folder("--out", args.out)
    if getattr(args, "json", None) is not None:
        validation.writable_file("--json", args.json)
    if getattr(args, "repeats", 1) < 1:
        raise ValueError(f"--repeats must be at least 1 (got {args.repeats})")
    for setting in args.set:
        parse_setting(setting)
    load_workflow(args.file)
    if getattr(args, "against", None):
        load_workflow(args.against)
