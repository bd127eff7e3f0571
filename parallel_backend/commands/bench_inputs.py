"""`tandem bench`'s inputs, checked before any model is built or worker started, without importing torch: the
CLI refuses a wrong one at once, and run_bench (bench.py) checks the same way when called directly."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .. import strategies
from ..engine.config import WEIGHTS, ParallelConfig
from ..engine.jobs import job_for
from ..engine.mesh import check_job
from ..models.bench_names import check_bench_model_name, check_still_images
from ..runtime import slowdown, validation
from ..runtime.devices import parse_devices, resolve_devices

MAX_RESOLUTION = 16384  # pixels per side
MAX_REPEATS = 1000
MAX_IMAGES = 64
DTYPE_NAMES = ("fp32", "fp16", "bf16")  # bench.DTYPES: their torch dtypes


def parse_resolution(text: str | int) -> tuple[int, int]:
    """"256" -> (256, 256); "1024x768" -> (1024, 768) as (H, W)."""
    parts = str(text).lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"resolution {text!r}: write pixels as 256 or 1024x768") from None
    if len(values) not in (1, 2) or min(values) < 8 or max(values) > MAX_RESOLUTION:
        raise ValueError(f"resolution {text!r}: write pixels as 256 or 1024x768 (from 8 to {MAX_RESOLUTION})")
    return (values[0], values[-1])


def check_bench_request(strategies_: tuple, steps, repeats, dtype: str) -> tuple[int, int]:
    """The bench's own inputs, before anything is built or started: known strategies, each once; steps and
    repeats in range (returned as ints); a known dtype."""
    if isinstance(strategies_, str) or not strategies_:
        raise ValueError(f"strategies must name at least one strategy ({', '.join(strategies.names())}); "
                         f"got {strategies_!r}")
    for strategy in strategies_:
        strategies.get(validation.text("strategy", strategy))
    twice = sorted({s for s in strategies_ if strategies_.count(s) > 1})
    if twice:
        raise ValueError(f"strategies name {', '.join(twice)} more than once; give each once")
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r}: choose auto, {', '.join(DTYPE_NAMES)}")
    return (validation.whole_number("steps", steps, 1, validation.MAX_STEPS),
            validation.whole_number("repeats", repeats, 0, MAX_REPEATS))


def balance_modes(balance: str | None) -> tuple:
    """The share modes each strategy runs in: (None,) for the config's default, else "equal" and/or "balanced"."""
    if balance is None:
        return (None,)
    if balance not in ("equal", "balanced", "both"):
        raise ValueError(f"balance {balance!r}: choose equal, balanced or both")
    return ("equal", "balanced") if balance == "both" else (balance,)


def weight_modes(weights: str | None) -> tuple:
    """--weights of the bench: one mode, or several comma-separated (a row per strategy and mode)."""
    if weights is None:
        return (WEIGHTS.default,)
    modes = tuple(dict.fromkeys(WEIGHTS.validate(w.strip()) for w in str(weights).split(",") if w.strip()))
    if not modes:
        raise ValueError("weights: give replicated, sharded or auto, or several of them separated by commas")
    return modes


def with_speeds(config, mode: str | None):
    return config if mode is None else replace(config, device_speeds="equal" if mode == "equal" else "measure")


def bench_knobs(strategy: str, knobs: dict | None) -> dict:
    """The config fields of `knobs` that apply to `strategy`: all but another strategy's axis degree (e.g.
    asyncdiff's stages for cfg), which the config would refuse."""
    own = strategies.get(strategy).axes
    return {k: v for k, v in (knobs or {}).items()
            if v is not None and (k in own or not getattr(strategies.knob(k), "axis", ""))}


@dataclass
class BenchInputs:
    """What check_bench_inputs found: the inputs normalised, each variant's config, the devices and meshes."""

    steps: int
    repeats: int
    cfg: float | None
    images: int | None
    modes: tuple
    weight_modes: tuple
    configs: dict  # strategy -> ParallelConfig
    variant_configs: dict  # (strategy, share mode, weights) -> ParallelConfig
    devices: tuple  # resolved: they exist, nothing started
    meshes: dict  # strategy -> its mesh on the devices
    resolution: tuple | None  # as given (None: the model's)


def check_bench_inputs(model_name: str, devices, strategies_: tuple, steps, resolution, repeats, dtype: str,
                       knobs: dict | None, frames, cfg, images, balance, test_slowdown) -> BenchInputs:
    """Every input of run_bench that can be checked before the model is built (the model's own refusals, such as
    a resolution its latents do not tile, come with it)."""
    check_bench_model_name(model_name)
    check_still_images(model_name, frames)
    steps, repeats = check_bench_request(strategies_, steps, repeats, dtype)
    if cfg is not None:
        cfg = validation.finite_number("cfg", cfg, 1.0, validation.MAX_CFG)
    if images is not None:
        images = validation.whole_number("images", images, 1, MAX_IMAGES)
    fixed_resolution = parse_resolution(resolution) if resolution is not None else None
    modes = balance_modes(balance)
    knobs = dict(knobs or {})
    weights = weight_modes(knobs.pop("weights", None))
    configs = {s: ParallelConfig(devices, s, weights=weights[0], **bench_knobs(s, knobs))
               for s in strategies_}  # validated up front, each variant too:
    variant_configs = {(s, mode, w): replace(with_speeds(configs[s], mode), weights=w)
                       for s in strategies_ for mode in modes for w in weights}
    resolved = resolve_devices(parse_devices(devices))  # devices that exist; nothing started
    meshes = {s: check_job(configs[s], len(resolved), job_for(s, cfg).cfg != 1.0) for s in strategies_}
    slowdown.parse(test_slowdown, len(resolved))  # refused before anything is built or started
    return BenchInputs(steps, repeats, cfg, images, modes, weights, configs, variant_configs, resolved, meshes,
                       fixed_resolution)
