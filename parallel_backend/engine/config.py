"""ParallelConfig: which devices, which strategy, which degrees. Validated on creation, starts nothing.

Creating a config never starts a process, opens a port or touches CUDA. What depends on the machine (do the
devices exist?) or on the job (is there an uncond branch?) is checked by `resolve_devices()` (runtime/devices.py,
which also parses the device names) when a pool starts and by `mesh.check_job()` when a job starts; every error
says what to change. The strategy names are the registry's (`strategies.names()`), plus "auto".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..runtime import validation
from ..runtime.devices import parse_devices
from ..runtime.speeds import parse_speeds


def strategy_choices() -> tuple[str, ...]:
    """"auto" and every registered strategy, for option lists (CLI, Settings node, demo)."""
    from .. import strategies

    return ("auto", *strategies.names())


# The inner mesh axes a strategy may add (config field -> what its degree means), in the order the fields sit.
AXES = {"stages": "they cut the model into stages",
        "ulysses": "it splits the token sequence and trades tokens for attention heads (all-to-all)",
        "ring": "it splits the token sequence and passes keys and values around a ring"}


@dataclass(frozen=True)
class ParallelConfig:
    """How a pool splits each model call.

    devices: "auto", "cuda:0,cuda:1", "cpu:2", or a list of device names.
    strategy: "auto" (exact: per model and call shape, the mesh the plan predicts fastest from the shape's
      second call, timed on one device, or one device where no split is predicted to reach 1.05x; see
      plan/calibrate.py; devices the choice leaves out sit out) or a registered strategy (`strategy_choices()`):
      "cfg", "batch", "asyncdiff" (the model cut into stages run on one-call-stale inputs: approximate after
      warm-up), "ulysses", "ring", "usp" (the token sequence split).
    cfg_degree, batch_degree, stages, ulysses, ring: the mesh (cfg outer, then batch, then the strategy's own
      axes: asyncdiff's stages, ulysses' or ring's sequence degree, usp's ring x ulysses); their product is at
      most the device count (devices beyond it sit out). None = from the strategy: cfg -> cfg_degree 2 x
      batch over the devices left, batch -> every device splits the batch, asyncdiff, ulysses, ring -> the
      devices left after cfg and batch (cfg_degree 2 on 4 devices = cfg 2 x stages 2), usp -> a degree given
      is kept, ring not given takes the devices left over ulysses (usp with ulysses 2 on 4 devices = ring 2 x
      ulysses 2), ulysses not given the most of them the model's heads divide by; neither given: ulysses the
      largest number dividing both the devices left and the heads, ring the rest (strategies/usp.py).
    warmup: asyncdiff's exact sampler steps at the start (all stages in sequence; at least 1 on two stages or
      more: the later stages start from what the warm-up hands them); stride: 1, or 2 to exchange
      activations every second call only; time_shift: a stage embeds the timestep its input came from.
    timeout_s: the longest any single wait on a worker may take (a dead worker is noticed at once anyway).
    device_speeds: mixed devices (speeds.py): "auto" (measured on the first call of a model and shape when the
      pool's devices differ), "measure", "equal", or one positive number per device ("1,0.5": the second takes
      twice as long); row shares, asyncdiff's cut and ring's token shards follow them.
    """

    devices: str | tuple[str, ...] = "auto"
    strategy: str = "auto"
    cfg_degree: int | None = None
    batch_degree: int | None = None
    stages: int | None = None
    ulysses: int | None = None
    ring: int | None = None
    warmup: int = 1
    stride: int = 1
    time_shift: bool = False
    timeout_s: float = 300.0
    device_speeds: str | tuple[float, ...] = "auto"
    device_list: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "device_list", parse_devices(self.devices))
        from . import mesh
        from .. import strategies

        validation.text("strategy", self.strategy)
        strategy = strategies.get(self.strategy) if self.strategy != "auto" else None
        for name in ("cfg_degree", "batch_degree", *AXES):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, validation.whole_number(name, getattr(self, name), 1))
        if strategy is None and any(getattr(self, n) is not None for n in ("cfg_degree", "batch_degree", *AXES)):
            raise ValueError("strategy 'auto' chooses the degrees itself: name a strategy to set them")
        if self.cfg_degree not in (None, 1, 2):
            raise ValueError(f"cfg_degree {self.cfg_degree}: there are only two branches (cond, uncond); use 1 or 2")
        if strategy is not None and strategy.default_cfg_degree == 2 and self.cfg_degree == 1:
            raise ValueError(f"strategy {self.strategy!r} with cfg_degree 1 splits nothing by branch: use strategy 'batch'")
        if strategy is not None and strategy.default_cfg_degree == 1 and not strategy.axes and self.cfg_degree == 2:
            raise ValueError(f"strategy {self.strategy!r} with cfg_degree 2: choose strategy 'cfg' (it composes with batch)")
        for axis in AXES:
            if getattr(self, axis) is not None and (strategy is None or axis not in strategy.axes):
                raise ValueError(f"{axis} {getattr(self, axis)}: {AXES[axis]}: choose a strategy that does "
                                 f"({', '.join(s for s in strategies.names() if axis in strategies.get(s).axes)})")
        self._check_schedule_knobs()
        object.__setattr__(self, "timeout_s", validation.seconds("timeout_s", self.timeout_s))
        known = None if self.device_list == ("auto",) else len(self.device_list)
        object.__setattr__(self, "device_speeds", parse_speeds(self.device_speeds, known))
        if self.device_list != ("auto",):
            mesh.resolve(self, len(self.device_list))  # the degrees must fit the named devices

    def _check_schedule_knobs(self) -> None:
        """warmup, stride and time_shift: their kinds and ranges (the least warm-up a strategy needs on more than
        one stage is the mesh's to check: `mesh.resolve`)."""
        object.__setattr__(self, "warmup", validation.whole_number(
            "warmup", self.warmup, 0, validation.MAX_STEPS))
        if isinstance(self.stride, bool) or self.stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2; got {self.stride!r}")
        object.__setattr__(self, "stride", int(self.stride))
        validation.flag("time_shift", self.time_shift)
