"""Device names: "cuda:0,box2:7000/cuda:1" read into one name per worker, and checked against this machine.

Parsing starts nothing and touches no hardware; `missing_devices`, `check_devices_exist` and `resolve_devices` ask
CUDA for the device count. ParallelConfig, the pool, the daemon (serve.py) and remote.py all read devices here.
"""

from __future__ import annotations

import os
import re

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
