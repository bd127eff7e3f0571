"""ParallelConfig: which devices, which strategy, which degrees. Validated on creation, starts nothing.

Creating a config never starts a process, opens a port or touches CUDA. What depends on the machine (do the
devices exist?) or on the job (is there an uncond branch?) is checked by `resolve_devices()` when a pool
starts and by `mesh.check_job()` when a job starts; every error says what to change. The strategy names are
the registry's (`strategies.names()`), plus "auto".
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from . import validation
from .speeds import parse_speeds


def strategy_choices() -> tuple[str, ...]:
    """"auto" and every registered strategy, for option lists (CLI, Settings node, demo)."""
    from . import strategies

    return ("auto", *strategies.names())

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")
# A device of another machine: HOST:PORT/DEVICE, where HOST:PORT is that machine's `tandem worker serve --listen`.
_REMOTE = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):(?P<port>\d{1,5})/(?P<device>.+)$")


def split_device(device: str) -> tuple[str | None, str]:
    """"box2:7000/cuda:0" -> ("box2:7000", "cuda:0"); a device of this machine -> (None, device)."""
    machine, slash, local = device.rpartition("/")
    return (machine, local) if slash else (None, device)


def remote_machines(devices: tuple[str, ...]) -> tuple[str, ...]:
    """The HOST:PORT of every other machine that `devices` (as parse_devices gives them) name, in order."""
    return tuple(dict.fromkeys(m for m, _ in map(split_device, devices) if m is not None))


def _parse_item(item: str) -> list[str]:
    remote = _REMOTE.match(item)
    prefix, local = (f"{remote['host']}:{remote['port']}/", remote["device"]) if remote else ("", item)
    if remote and not 0 < int(remote["port"]) < 65536:
        raise ValueError(f"device {item!r}: port {remote['port']} is not between 1 and 65535")
    match = _DEVICE.match(local)
    if not match:
        if "/" in item:
            raise ValueError(f"device {item!r} is not understood; a device of another machine is written "
                             "HOST:PORT/DEVICE, e.g. '10.0.0.2:7000/cuda:0' or 'box2:7000/cpu:2'")
        raise ValueError(f"device {item!r} is not understood; write 'cuda:0,cuda:1', 'cpu:2' or 'auto'")
    kind, index = match.groups()
    if kind == "cuda":
        return [f"{prefix}cuda:{index or 0}"]
    count = int(index) if index is not None else 1
    if count < 1:
        raise ValueError(f"{item!r}: a CPU pool needs at least one worker")
    return [f"{prefix}cpu"] * count


def parse_devices(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """"cuda:0,cuda:1" -> ("cuda:0", "cuda:1"); "cpu:2" and "cpu,cpu" -> ("cpu", "cpu"); "auto" -> ("auto",).

    For CPU, "cpu:N" means N CPU workers (each with its share of the cores); for CUDA, "cuda:N" is device N.
    A device of another machine is HOST:PORT/DEVICE (HOST a name or an IPv4 address, [IPv6] in brackets; PORT
    where that machine's `tandem worker serve` listens): "cuda:0,box2:7000/cuda:0,box2:7000/cuda:1";
    "box2:7000/cpu:2" gives two CPU workers there.
    """
    if not isinstance(spec, (str, list, tuple)) or not all(isinstance(item, str) for item in spec):
        raise TypeError(f"devices must be text like 'cuda:0,cuda:1', 'cpu:2' or 'auto', or a list of device "
                        f"names; got {spec!r}")
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if items == ["auto"]:
        return ("auto",)
    if not items:
        raise ValueError("devices is empty; give e.g. 'cuda:0,cuda:1', 'cpu:2' or 'auto'")
    devices = [device for item in items for device in _parse_item(item)]
    cuda = [d for d in devices if split_device(d)[1] != "cpu"]
    if len(set(cuda)) != len(cuda):
        raise ValueError(f"devices {','.join(devices)} name a CUDA device twice; give each GPU once")
    if cuda and len(cuda) != len(devices):
        raise ValueError("devices mix CPU and CUDA workers; use GPUs only or CPU workers only")
    return tuple(devices)


class PoolUnavailable(RuntimeError):
    """A pool of the devices cannot take calls here now, for a reason of the machines or of the user's switch,
    not of the call: GPUs on Windows (no NCCL), no device reachable, another machine that refused or did not
    answer, a host's pool switched off. A host takes its stock path with this sentence."""


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def missing_devices(devices: tuple[str, ...]) -> tuple[str, ...]:
    """The CUDA devices among `devices` (as parse_devices gives them) that this machine lacks (touches CUDA)."""
    count = _cuda_device_count()
    return tuple(d for d in devices if d.startswith("cuda:") and int(d[5:]) >= count)  # another machine's: not here


def check_devices_exist(devices: tuple[str, ...]) -> None:
    """Raises ValueError naming, in one sentence, every device of `devices` that this machine lacks."""
    missing = missing_devices(devices)
    if missing:
        count = _cuda_device_count()
        have = ", ".join(f"cuda:{i}" for i in range(count)) or "none"
        verb = "does" if len(missing) == 1 else "do"
        raise ValueError(f"{', '.join(missing)} {verb} not exist: this machine has {count} CUDA device(s) ({have}); "
                         "change devices (or use 'cpu:2' for CPU workers)")


def resolve_devices(devices: tuple[str, ...]) -> tuple[str, ...]:
    """Turns "auto" into this machine's devices and checks that named CUDA devices exist (touches CUDA)."""
    import sys

    count = _cuda_device_count()
    if sys.platform == "win32" and (count if devices == ("auto",) else any(d != "cpu" for d in devices)):
        # The workers' GPU traffic needs NCCL, which PyTorch does not ship for Windows. Hosts take their stock
        # path with this sentence (ComfyUI's nodes log it); CPU workers still work.
        raise PoolUnavailable("GPU pools need NCCL, which PyTorch does not ship for Windows: Tandem cannot split "
                              "work over GPUs here (use Linux or WSL2); devices 'cpu:N' still work")
    if devices == ("auto",):
        if count >= 1:
            return tuple(f"cuda:{i}" for i in range(count))
        return ("cpu",) * (2 if (os.cpu_count() or 1) >= 2 else 1)
    check_devices_exist(devices)
    return devices


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
        from . import mesh, strategies

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
