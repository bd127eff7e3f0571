"""ParallelConfig: which devices, which strategy, which degrees. Validated on creation, starts nothing.

Creating a config never starts a process, opens a port or touches CUDA. What depends on the machine (do the
devices exist?) or on the job (is there an uncond branch?) is checked by `resolve_devices()` when a pool
starts and by `check_job()` when a job starts; every error says what to change.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

STRATEGIES = ("auto", "batch", "cfg", "asyncdiff")

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def parse_devices(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """"cuda:0,cuda:1" -> ("cuda:0", "cuda:1"); "cpu:2" and "cpu,cpu" -> ("cpu", "cpu"); "auto" -> ("auto",).

    For CPU, "cpu:N" means N CPU workers (each with its share of the cores); for CUDA, "cuda:N" is device N.
    """
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if items == ["auto"]:
        return ("auto",)
    if not items:
        raise ValueError("devices is empty; give e.g. 'cuda:0,cuda:1', 'cpu:2' or 'auto'")
    devices: list[str] = []
    for item in items:
        match = _DEVICE.match(item)
        if not match:
            raise ValueError(f"device {item!r} is not understood; write 'cuda:0,cuda:1', 'cpu:2' or 'auto'")
        kind, index = match.groups()
        if kind == "cpu":
            count = int(index) if index is not None else 1
            if count < 1:
                raise ValueError(f"{item!r}: a CPU pool needs at least one worker")
            devices += ["cpu"] * count
        else:
            devices.append(f"cuda:{index or 0}")
    cuda = [d for d in devices if d != "cpu"]
    if len(set(cuda)) != len(cuda):
        raise ValueError(f"devices {','.join(devices)} name a CUDA device twice; give each GPU once")
    if cuda and len(cuda) != len(devices):
        raise ValueError("devices mix CPU and CUDA workers; use GPUs only or CPU workers only")
    return tuple(devices)


def resolve_devices(devices: tuple[str, ...]) -> tuple[str, ...]:
    """Turns "auto" into this machine's devices and checks that named CUDA devices exist (touches CUDA)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if devices == ("auto",):
        if count >= 1:
            return tuple(f"cuda:{i}" for i in range(count))
        return ("cpu",) * (2 if (os.cpu_count() or 1) >= 2 else 1)
    for device in devices:
        if device.startswith("cuda:") and int(device[5:]) >= count:
            have = ", ".join(f"cuda:{i}" for i in range(count)) or "none"
            raise ValueError(f"{device} does not exist: this machine has {count} CUDA device(s) ({have}); "
                             "change devices (or use 'cpu:2' for CPU workers)")
    return devices


@dataclass(frozen=True)
class ParallelConfig:
    """How a pool splits each model call.

    devices: "auto", "cuda:0,cuda:1", "cpu:2", or a list of device names.
    strategy: "auto" (exact: cfg with guidance, batch without), "cfg", "batch" or "asyncdiff" (the model cut
      into stages run on one-call-stale inputs: approximate after warm-up).
    cfg_degree, batch_degree, stages: the mesh (cfg outer, then batch, then stages inner); their product is
      the device count. None = derived from strategy: cfg -> cfg_degree 2 (x batch for the remaining devices),
      batch -> every device splits the batch, asyncdiff -> every device holds a stage (set cfg_degree 2 for
      e.g. 4 devices = cfg 2 x stages 2).
    warmup: asyncdiff's exact sampler steps at the start (all stages in sequence); stride: 1, or 2 to exchange
      activations every second call only; time_shift: a stage embeds the timestep its input came from.
    timeout_s: the longest any single wait on a worker may take (a dead worker is noticed at once anyway).
    """

    devices: str | tuple[str, ...] = "auto"
    strategy: str = "auto"
    cfg_degree: int | None = None
    batch_degree: int | None = None
    stages: int | None = None
    warmup: int = 1
    stride: int = 1
    time_shift: bool = False
    timeout_s: float = 300.0
    device_list: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "device_list", parse_devices(self.devices))
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of: {', '.join(STRATEGIES)}")
        for name in ("cfg_degree", "batch_degree", "stages"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1; got {value}")
        if self.cfg_degree not in (None, 1, 2):
            raise ValueError(f"cfg_degree {self.cfg_degree}: there are only two branches (cond, uncond); use 1 or 2")
        if self.strategy == "cfg" and self.cfg_degree == 1:
            raise ValueError("strategy 'cfg' with cfg_degree 1 splits nothing by branch: use strategy 'batch'")
        if self.strategy == "batch" and self.cfg_degree == 2:
            raise ValueError("strategy 'batch' with cfg_degree 2: choose strategy 'cfg' (it composes with batch)")
        if self.stages not in (None, 1) and self.strategy != "asyncdiff":
            raise ValueError(f"stages {self.stages} cut the model: that is strategy 'asyncdiff'")
        if int(self.warmup) != self.warmup or self.warmup < 0:
            raise ValueError(f"warmup must be a whole number of sampler steps >= 0; got {self.warmup}")
        if self.stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2; got {self.stride}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0; got {self.timeout_s}")
        if self.device_list != ("auto",):
            self.degrees(len(self.device_list))  # validates the mesh against the named devices

    def degrees(self, n_devices: int, cfg_scale: float | None = None) -> dict[str, int]:
        """{"cfg", "batch", "stages"} degrees for `n_devices`, product checked; cfg_scale decides "auto"."""
        strategy = self.strategy
        if strategy == "auto":
            strategy = "batch" if cfg_scale == 1.0 or self.cfg_degree == 1 else "cfg"
        cfg_degree = self.cfg_degree or (2 if strategy == "cfg" else 1)
        if cfg_degree == 2 and n_devices % 2:
            raise ValueError(f"strategy 'cfg' splits cond and uncond over an even number of devices; "
                             f"got {n_devices}: use an even count or strategy 'batch'")
        if strategy == "asyncdiff":
            batch_degree = self.batch_degree or 1
            stages = self.stages or max(1, n_devices // (cfg_degree * batch_degree))
        else:
            batch_degree, stages = self.batch_degree or max(1, n_devices // cfg_degree), 1
        if cfg_degree * batch_degree * stages != n_devices:
            raise ValueError(f"cfg_degree {cfg_degree} x batch_degree {batch_degree} x stages {stages} = "
                             f"{cfg_degree * batch_degree * stages}, but there are {n_devices} devices; "
                             "make the product equal the device count")
        return {"cfg": cfg_degree, "batch": batch_degree, "stages": stages}

    def check_job(self, n_devices: int, cfg_scale: float) -> dict[str, int]:
        """Degrees for a job sampled with guidance `cfg_scale`; raises if the mesh cannot serve it."""
        degrees = self.degrees(n_devices, cfg_scale)
        cfg_degree = degrees["cfg"]
        if cfg_degree == 2 and cfg_scale == 1.0:
            raise ValueError("cfg degree 2 needs cfg > 1; this job runs with cfg=1.0 (no uncond branch): "
                             "use strategy 'batch' or 'auto'")
        return degrees
