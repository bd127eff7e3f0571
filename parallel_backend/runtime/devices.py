"""Device names: "cuda:0,box2:7000/cuda:1" read into one name per worker, and checked against this machine.

Parsing starts nothing and touches no GPU: it counts this machine's cores and available memory, which bound its CPU
workers (`cpu_worker_limit`); `missing_devices`, `check_devices_exist` and `resolve_devices` ask CUDA for the
device count, and only where CUDA devices are named or `auto` is. ParallelConfig, the pool, the daemon (serve.py)
and remote.py all read devices here.
"""

from __future__ import annotations

import os
import re
import sys

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")
# A device of another machine: HOST:PORT/DEVICE, where HOST:PORT is that machine's `tandem worker serve --listen`.
MAX_CPU_WORKERS = 256  # CPU workers of another machine (its `tandem worker serve` applies its own limit, below)
CPU_WORKERS_PER_CORE = 4  # this machine's CPU workers, at most, per core it may run on ...
MIN_CPU_WORKERS = 8  # ... but this many on any machine (the tests' largest meshes run on one or two cores)
CPU_WORKER_BYTES = 256 * 2**20  # the least memory a CPU worker needs: an interpreter with torch, before any model
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
    if not prefix:
        check_cpu_workers(count, item)  # before a list of `count` names is made
    elif count > MAX_CPU_WORKERS:
        raise ValueError(f"device {item!r}: {count} CPU workers are more than Tandem runs on one machine; give at "
                         f"most {MAX_CPU_WORKERS}")
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
    check_cpu_workers(devices.count("cpu"), ",".join(items))
    cuda = [d for d in devices if split_device(d)[1] != "cpu"]
    if len(set(cuda)) != len(cuda):
        raise ValueError(f"devices {','.join(devices)} name a CUDA device twice; give each GPU once")
    if cuda and len(cuda) != len(devices):
        raise ValueError("devices mix CPU and CUDA workers; use GPUs only or CPU workers only")
    return tuple(devices)


def _available_memory() -> int | None:
    """The bytes of memory this machine has available now (None: psutil missing, no way to tell)."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().available


def cpu_worker_limit() -> tuple[int, str]:
    """(the most CPU workers this machine can run, why): CPU_WORKERS_PER_CORE per core this process may run on
    (at least MIN_CPU_WORKERS), and no more than its available memory holds at CPU_WORKER_BYTES each."""
    from .portable import cpu_cores

    cores = len(cpu_cores())
    by_cores = max(MIN_CPU_WORKERS, CPU_WORKERS_PER_CORE * cores)
    why = f"{cores} core(s) allow {by_cores} ({CPU_WORKERS_PER_CORE} per core, at least {MIN_CPU_WORKERS})"
    available = _available_memory()
    if available is None:
        return by_cores, why
    by_memory = available // CPU_WORKER_BYTES
    return min(by_cores, by_memory), (f"{why} and {available / 2**30:.1f} GiB of available memory allows "
                                      f"{by_memory} ({CPU_WORKER_BYTES // 2**20} MiB each)")


def check_cpu_workers(count: int, given) -> None:
    """Refuses `count` CPU workers of this machine (the devices `given` name them) where it cannot run them, before
    any starts (cpu_worker_limit)."""
    if count <= 1:
        return
    limit, why = cpu_worker_limit()
    if count > limit:
        fix = f"give cpu:{limit} or fewer" if limit >= 1 else "free some memory first"
        raise ValueError(f"devices {given!r}: {count} CPU workers are more than this machine can run: {why}; {fix}")


class PoolUnavailable(RuntimeError):
    """A pool of the devices cannot take calls here now, for a reason of the machines or of the user's switch,
    not of the call: GPUs on Windows (no NCCL), no device reachable, another machine that refused or did not
    answer, a host's pool switched off. A host takes its stock path with this sentence."""


GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd")  # NVIDIA, WSL2, ROCm drivers


def cuda_device_count() -> int:
    """CUDA devices this machine has. On Linux without any GPU driver's device file, 0 without importing torch
    (a refusal of a CUDA device then takes no second); elsewhere torch counts them."""
    if sys.platform.startswith("linux") and "torch" not in sys.modules \
            and not any(os.path.exists(path) for path in GPU_DEVICE_FILES):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def missing_devices(devices: tuple[str, ...]) -> tuple[str, ...]:
    """The CUDA devices among `devices` (as parse_devices gives them) that this machine lacks (touches CUDA, if
    any is named)."""
    if not any(d.startswith("cuda:") for d in devices):
        return ()
    count = cuda_device_count()
    return tuple(d for d in devices if d.startswith("cuda:") and int(d[5:]) >= count)  # another machine's: not here


def check_devices_exist(devices: tuple[str, ...]) -> None:
    """Raises ValueError naming, in one sentence, every device of `devices` that this machine lacks."""
    missing = missing_devices(devices)
    if missing:
        count = cuda_device_count()
        have = ", ".join(f"cuda:{i}" for i in range(count)) or "none"
        verb = "does" if len(missing) == 1 else "do"
        raise ValueError(f"{', '.join(missing)} {verb} not exist: this machine has {count} CUDA device(s) ({have}); "
                         "change devices (or use 'cpu:2' for CPU workers)")


def resolve_devices(devices: tuple[str, ...]) -> tuple[str, ...]:
    """Turns "auto" into this machine's devices and checks that named CUDA devices exist (touches CUDA, for "auto"
    or CUDA devices)."""
    gpus = devices == ("auto",) or any(d != "cpu" for d in devices)
    count = cuda_device_count() if gpus else 0
    if sys.platform == "win32" and (count if devices == ("auto",) else gpus):
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
