"""ParallelConfig: which devices, which strategy, which degrees. Validated on creation, starts nothing.

Creating a config never starts a process, opens a port or touches CUDA. What depends on the machine (do the
devices exist?) or on the job (is there an uncond branch?) is checked by `resolve_devices()` (runtime/devices.py,
which also parses the device names) when a pool starts and by `mesh.check_job()` when a job starts; every error
says what to change. The strategy names are the registry's (`strategies.names()`), plus "auto".

The config's own settings are declared here once (`SETTINGS`, runtime/knobs.py `Knob`s), the strategies' in
their classes (`Strategy.knobs`); the CLI, the Settings node and the demo build their inputs from both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..runtime import validation
from ..runtime.devices import parse_devices
from ..runtime.knobs import Knob
from ..runtime.pool_settings import POOL_SETTINGS
from ..runtime.speeds import parse_speeds


def strategy_choices() -> tuple[str, ...]:
    """"auto" and every registered strategy, for option lists (CLI, Settings node, demo)."""
    from .. import strategies

    return ("auto", *strategies.names())


def _cfg_degree(name: str, value) -> int:
    number = validation.whole_number(name, value, 1)
    if number > 2:
        raise ValueError(f"{name} {number}: there are only two branches (cond, uncond); use 1 or 2")
    return number


def _as_given(name: str, value):
    return value  # parsed where the device count is known: ParallelConfig.__init__


# The config's own settings, declared once (the strategies declare theirs: `Strategy.knobs`).
DEVICES = Knob("devices", str, "auto", "'auto', 'cuda:0,cuda:1', 'cpu:2' (two CPU workers), or another machine's "
               "device HOST:PORT/DEVICE (e.g. 10.0.0.2:7000/cuda:0)", check=_as_given)
STRATEGY = Knob("strategy", str, "auto", "auto or a registered strategy (`strategy_choices()`)")
CFG_DEGREE = Knob("cfg_degree", int, None, "devices that split the cond and uncond branches: 1 or 2", low=1, high=2,
                  unset=True, check=_cfg_degree)
BATCH_DEGREE = Knob("batch_degree", int, None, "row groups that split the images", low=1, unset=True)
TIMEOUT = Knob("timeout_s", float, 300.0, "longest wait on a worker, seconds (finite, > 0)", check=validation.seconds)
DEVICE_SPEEDS = Knob("device_speeds", str, "auto", "mixed devices: auto (measured when the devices differ), measure, "
                     "equal, or one positive number per device such as 1,0.5 (the second takes twice as long)",
                     check=_as_given)
WEIGHTS = Knob("weights", str, "replicated", "replicated (every device holds the whole model), sharded (each "
               "holds 1/N of every block and gathers a block as it runs) or auto (sharded where the whole does not "
               "fit the memory per device); asyncdiff's stages hold only their own layers whatever it says", choices=("replicated", "sharded", "auto"))
MEMORY_PER_DEVICE = Knob("memory_per_device", float, None, "max memory per device (GiB): what weights 'auto' and the "
                         "plan may fill", unset=True, check=validation.positive,
                         unset_means="what a CUDA device has free, or a share of the machine's available memory for "
                                     "CPU workers", label="max memory per device (GiB)")
# `tandem plan --gpu`'s weights on paper (plan/fitted.py job_inputs): 16-bit floats as the checkpoints ship (bf16;
# fp16 for SDXL), or fp8 (e4m3fn) as ComfyUI's fp8 checkpoints store them, 1 byte a parameter (the norms and biases
# such files keep in 16 bits, under 1 % of a DiT's parameters, are counted at 1 too). Compute is counted at bf16
# either way: ComfyUI casts fp8 weights up to the compute dtype layer by layer (its fp8 matmuls are not modelled).
WEIGHT_BYTES = {"bf16": 2, "fp8": 1}
WEIGHTS_DTYPE = Knob("weights_dtype", str, "bf16", "with --gpu: the full-size model's weights in bf16 (2 bytes a "
                     "parameter) or fp8 (1 byte, as ComfyUI's fp8 checkpoints; compute still counted at bf16)",
                     choices=tuple(WEIGHT_BYTES))
ALLOW_STALE = Knob("allow_stale", bool, False, "auto may choose an approximate strategy (asyncdiff, patch, "
                   "pipefusion: stale after their exact warm-up, so the image differs a little from one device's) "
                   "where it is predicted fastest; off: exact strategies only, the image equal to one device's")
SETTINGS = (DEVICES, STRATEGY, CFG_DEGREE, BATCH_DEGREE, TIMEOUT, DEVICE_SPEEDS, WEIGHTS, MEMORY_PER_DEVICE,
            ALLOW_STALE, *POOL_SETTINGS)
MEMORY_KNOBS = (WEIGHTS, MEMORY_PER_DEVICE)  # on forms after the package's strategies' knobs (form_knobs)
AUTO_KNOBS = (ALLOW_STALE,)  # on forms after the memory knobs, before the knobs of strategies registered later
MESH_KNOBS = (CFG_DEGREE, BATCH_DEGREE)  # the outer degrees: inputs of the Settings node, before the strategies'
POSITIONAL = ("devices", "strategy", "cfg_degree", "batch_degree")


def form_knobs() -> tuple[Knob, ...]:
    """The knobs a settings form shows after devices and strategy, in the order they were added (the Settings
    node's inputs: saved workflows keep widget values in input order): the outer degrees, the package's first
    strategies' knobs, where the weights live, whether auto may choose a stale strategy, then the knobs of
    strategies registered later (the package's newer ones first)."""
    from .. import strategies

    builtin = strategies.builtin_knobs()
    return (*MESH_KNOBS, *builtin, *MEMORY_KNOBS, *AUTO_KNOBS, *strategies.knobs()[len(builtin):])


@dataclass(frozen=True, init=False)
class ParallelConfig:
    """How a pool splits each model call: the one settings object of a job.

    devices: "auto", "cuda:0,cuda:1", "cpu:2", or a list of device names.
    strategy: "auto" (exact: per model and call shape, the mesh the plan predicts fastest from the shape's
      second call, timed on one device, or one device where no split is predicted to reach 1.05x; see
      plan/calibrate.py; devices the choice leaves out sit out) or a registered strategy (`strategy_choices()`):
      "cfg", "batch", "asyncdiff" (the model cut into stages run on one-call-stale inputs: approximate after
      warm-up), "ulysses", "ring", "usp" (the token sequence split).
    cfg_degree, batch_degree: the outer mesh (cfg outer, then batch); None = from the strategy: cfg -> cfg_degree
      2 x batch over the devices left, batch -> every device splits the batch, a strategy with axes -> its axes
      take the devices left after cfg and batch.
    **knobs: the strategies' own settings, by name (`strategies.knobs()`): their axes' degrees (asyncdiff's
      stages, ulysses' and ring's sequence degrees, usp's ring x ulysses: strategies/usp.py) and the settings
      they read (asyncdiff's warmup, stride, time_shift). Read as attributes (`config.warmup`); one not given
      is its declared default. An axis' degree is refused for a strategy without that axis; the product of the
      degrees is at most the device count (devices beyond it sit out). Other knobs are ignored by the
      strategies that do not declare them.
    timeout_s: the longest any single wait on a worker may take (a dead worker is noticed at once anyway).
    device_speeds: mixed devices (speeds.py): "auto" (measured on the first call of a model and shape when the
      pool's devices differ), "measure", "equal", or one positive number per device ("1,0.5": the second takes
      twice as long); row shares, asyncdiff's cut and ring's token shards follow them.
    weights: "replicated" (every device holds the whole model), "sharded" (each device of a group that runs
      every call together keeps 1/N of each block's parameters and gathers a block as it runs:
      engine/weights.py) or "auto" (sharded where the whole weights do not fit `memory_per_device`).
    memory_per_device: GiB each device may hold; None: what a CUDA device has free, or this machine's available
      memory shared among its CPU workers.
    allow_stale: auto may choose an approximate strategy (asyncdiff, patch) where the plan predicts it fastest;
      False (the default): exact strategies only.
    secret_file, interface, allow_missing_machines, hang_factor, hang_floor_s, max_models: the pool's settings
      (runtime/pool_settings.py; WorkerPool has their meanings); None: the environment's (runtime/environment.py).
    Every value is checked on creation, before any work; creating a config starts nothing.
    """

    devices: str | tuple[str, ...] = DEVICES.default
    strategy: str = STRATEGY.default
    cfg_degree: int | None = None
    batch_degree: int | None = None
    timeout_s: float = TIMEOUT.default
    device_speeds: str | tuple[float, ...] = DEVICE_SPEEDS.default
    weights: str = WEIGHTS.default
    memory_per_device: float | None = None
    allow_stale: bool = ALLOW_STALE.default
    secret_file: str | None = None
    interface: str | None = None
    allow_missing_machines: bool | None = None
    hang_factor: float | None = None
    hang_floor_s: float | None = None
    max_models: int | None = None
    knobs: tuple[tuple[str, Any], ...] = ()  # the strategy knobs given, (name, value) in name order, defaults left out
    device_list: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __init__(self, *args, knobs=(), **named):
        if len(args) > len(POSITIONAL):
            raise TypeError(f"ParallelConfig takes at most {len(POSITIONAL)} values by position "
                            f"({', '.join(POSITIONAL)})")
        for name, value in zip(POSITIONAL, args):
            if name in named:
                raise TypeError(f"ParallelConfig got {name} twice")
            named[name] = value
        for knob in SETTINGS:
            object.__setattr__(self, knob.name, knob.validate(named.pop(knob.name, knob.default)))
        object.__setattr__(self, "knobs", self._checked_knobs({**dict(knobs), **named}))
        self._check_combination()

    def __getattr__(self, name: str):
        """A strategy knob's value (its default when not given)."""
        from .. import strategies

        knob = strategies.knob(name) if not name.startswith("_") else None
        if knob is None:
            raise AttributeError(f"ParallelConfig has no setting {name!r}")
        return dict(self.__dict__.get("knobs", ())).get(name, knob.default)

    @staticmethod
    def _checked_knobs(given: dict) -> tuple[tuple[str, Any], ...]:
        from .. import strategies

        kept = {}
        for name, value in given.items():
            knob = strategies.knob(name)
            if knob is None:
                raise TypeError(f"unknown setting {name!r}; the strategies' settings are: "
                                f"{', '.join(k.name for k in strategies.knobs())}")
            value = knob.validate(value)
            if value != knob.default:
                kept[name] = value
        return tuple(sorted(kept.items()))

    def _check_combination(self) -> None:
        object.__setattr__(self, "device_list", parse_devices(self.devices))
        from . import mesh
        from .. import strategies

        strategy = strategies.get(self.strategy) if self.strategy != "auto" else None
        axes = [knob.name for knob in strategies.knobs() if knob.axis]
        degrees = [n for n in ("cfg_degree", "batch_degree", *axes) if getattr(self, n) is not None]
        if strategy is None and degrees:
            raise ValueError("strategy 'auto' chooses the degrees itself: name a strategy to set them")
        if strategy is not None and strategy.default_cfg_degree == 2 and self.cfg_degree == 1:
            raise ValueError(f"strategy {self.strategy!r} with cfg_degree 1 splits nothing by branch: use strategy 'batch'")
        if strategy is not None and strategy.default_cfg_degree == 1 and not strategy.axes and self.cfg_degree == 2:
            raise ValueError(f"strategy {self.strategy!r} with cfg_degree 2: choose strategy 'cfg' (it composes with batch)")
        for axis in axes:
            if getattr(self, axis) is not None and (strategy is None or axis not in strategy.axes):
                raise ValueError(f"{axis} {getattr(self, axis)}: {strategies.knob(axis).axis}: choose a strategy that "
                                 f"does ({', '.join(strategies.users(axis, axes_only=True))})")
        known = None if self.device_list == ("auto",) else len(self.device_list)
        object.__setattr__(self, "device_speeds", parse_speeds(self.device_speeds, known))
        if self.device_list != ("auto",):
            mesh.resolve(self, len(self.device_list))  # the degrees must fit the named devices

    def pool_options(self) -> dict:
        """The WorkerPool arguments this config sets (the host adds its own: import paths, worker set-up)."""
        return {"timeout_s": self.timeout_s, **{knob.name: getattr(self, knob.name) for knob in POOL_SETTINGS}}
