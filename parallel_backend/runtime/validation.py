"""Checks of what users hand in (CLI options, API fields), shared by the CLI, GenerationRequest, ParallelConfig,
the bench and the demo, so every entry point refuses the same input with the same sentence before any work.

Each check names the field and raises one sentence: TypeError for a value of the wrong kind, ValueError for a
value out of range, a path that cannot be used or a job that cannot fit in memory. Checks return the value
normalised (an int for a whole number, a float for a real one) for the caller to keep.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import stat
import sys
import tempfile
from pathlib import Path

MAX_STEPS = 10_000  # a sampler's steps; beyond it the schedule alone fills memory (10**9 steps: 23 GB)
MAX_IMAGES = 10_000  # images of one request (memory bounds it further: `fits_in_memory`)
MAX_CFG = 100.0  # guidance scale; ComfyUI's KSampler has the same bound
SEED_LIMIT = 2**63  # seeds are in [0, SEED_LIMIT): the sampler also seeds seed + 1
MAX_JSON_BYTES = 64 * 2**20  # a JSON file read whole (a workflow with images inside, a model's index); more is refused


def _kind(value) -> str:
    return type(value).__name__


def whole_number(name: str, value, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high]; an integral float (20.0, from a UI or JSON) counts, 2.5 does not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a whole number; got {value!r} ({_kind(value)})")
    span = f"from {low} to {high}" if high is not None else f">= {low}"
    if not (isinstance(value, numbers.Integral) or (math.isfinite(value) and float(value).is_integer())):
        raise ValueError(f"{name} must be a whole number {span}; got {value!r}")
    number = int(value)
    if number < low or (high is not None and number > high):
        raise ValueError(f"{name} must be a whole number {span}; got {number}")
    return number


def finite_number(name: str, value, low: float | None = None, high: float | None = None) -> float:
    """`value` as a finite float in [low, high] (either bound may be None)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number; got {value!r} ({_kind(value)})")
    number = float(value)
    span = "" if low is None and high is None else (
        f" from {low:g} to {high:g}" if low is not None and high is not None
        else f" >= {low:g}" if low is not None else f" <= {high:g}")
    if not math.isfinite(number) or (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{name} must be a finite number{span}; got {value!r}")
    return number


def positive(name: str, value, unit: str = "") -> float:
    """A finite number > 0 (`unit`, e.g. " of seconds", goes into the sentence)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number{unit} > 0; got {value!r}")
    return float(value)


def seconds(name: str, value) -> float:
    """A time limit: a finite number of seconds > 0."""
    return positive(name, value, " of seconds")


def text(name: str, value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be text; got {value!r} ({_kind(value)})")
    return value


def one_of(name: str, value, choices) -> str:
    """`value`, which must be one of `choices` (text)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(map(str, choices))}")
    return value


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r} ({_kind(value)})")
    return value


def seed(value, name: str = "seed") -> int:
    return whole_number(name, value, 0, SEED_LIMIT - 1)


def http_url(option: str, url) -> str:
    """A server address: http://HOST[:PORT] or https://..., PORT from 1 to 65535."""
    from urllib.parse import urlparse

    example = "give the server's address, e.g. http://127.0.0.1:8188"
    try:
        parts = urlparse(url) if isinstance(url, str) else None
    except ValueError as exc:  # "Invalid IPv6 URL": a bracket left open
        raise ValueError(f"{option} {url!r} is not an address ({exc}); {example}") from None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{option} {url!r}: {example}")
    try:
        port = parts.port
    except ValueError:  # "Port out of range 0-65535", or not a number
        port = 0
    if port == 0:
        raise ValueError(f"{option} {url!r}: the port must be a number from 1 to 65535; {example}")
    return url


def file_kind(path) -> str:
    """What `path` is, in words: "a regular file", "a folder", "a character device", "a named pipe", ..."""
    mode = os.stat(path).st_mode
    for test, words in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "not a regular file"


def _probe_writable(option: str, folder: Path, path) -> None:
    """Creates and removes a file in `folder` (the only sure test: permissions, read-only mounts, /proc)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ValueError(f"{option} {path}: could not write there ({exc.strerror or exc})") from None


def writable_file(option: str, path, suffixes: tuple[str, ...] = (), what: str = "a file") -> Path:
    """A `what` (e.g. "an image file") path ending in one of `suffixes` (any if none) whose folder exists and
    takes new files; a folder's name (ending in a separator), a device or a pipe is refused."""
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise ValueError(f"{option} needs {what} name; got {path!r}")
    if str(path).endswith(("/", os.sep)):
        raise ValueError(f"{option} {path}: a name ending in {str(path)[-1]!r} is a folder's; give {what} name")
    out = Path(path)
    if suffixes and out.suffix.lower() not in suffixes:
        raise ValueError(f"{option} {path}: use {what} name ending in {', '.join(suffixes)}")
    folder = out.parent.resolve()
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: folder {folder} does not exist")
    if out.is_dir():
        raise ValueError(f"{option} {path}: could not write there (it is a folder)")
    if out.exists() and not out.is_file():
        raise ValueError(f"{option} {path}: it is {file_kind(out)}, not a regular file; give {what} name")
    _probe_writable(option, folder, path)
    return out


def write_json(option: str, path, data, default=None) -> None:
    """Writes `data` as JSON to `path` (checked by writable_file before the work); a failure names the file."""
    try:
        with open(path, "w") as f:
            json.dump(data, f, indent=2, default=default)
    except OSError as exc:
        raise OSError(f"{option} {path}: could not write the JSON ({exc.strerror or exc})") from None


def creatable_folder(option: str, path) -> Path:
    """A folder that exists and takes new files, or can be made inside the nearest folder that exists."""
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise ValueError(f"{option} needs a folder name; got {path!r}")
    folder = Path(path).resolve()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{option} {path}: {existing} is a file, not a folder")
    _probe_writable(option, existing, path)
    return Path(path)


def read_json(path, what: str = ""):
    """The JSON value in file `path` (a regular file of at most MAX_JSON_BYTES); every failure is one sentence
    naming the file (`what`, e.g. "workflow file", goes before its name)."""
    label = f"{what} {path}".strip()
    too_large = f"more than the {MAX_JSON_BYTES // 2**20} MiB a JSON file may hold"
    try:
        if not Path(path).is_file():  # a device or a pipe would be read until killed
            raise ValueError(f"{label} is {file_kind(path)}, not a regular file; give a JSON file")
        size = os.path.getsize(path)
        if size > MAX_JSON_BYTES:
            raise ValueError(f"{label} holds {size / 2**20:.1f} MiB, {too_large}")
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)  # a file that grew since: read no more than the bound
    except OSError as exc:
        raise ValueError(f"{label} could not be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise ValueError(f"{label} holds {too_large}")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{label} is not UTF-8 text (byte {exc.start}; a JSON file was expected)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{label} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise ValueError(f"{label} nests JSON arrays or objects too deeply to read (more than about "
                         f"{sys.getrecursionlimit()} levels)") from None
    except ValueError:  # a number of more digits than Python reads (sys.get_int_max_str_digits)
        raise ValueError(f"{label} holds a number of more digits than Python reads "
                         f"({sys.get_int_max_str_digits()})") from None


def read_json_object(path: Path, what: str = "") -> dict:
    """The JSON object in `path`; every failure is one sentence naming the file."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise ValueError(f"{f'{what} {path}'.strip()} holds a JSON {_kind(data)}, not the object expected")
    return data


_TORCH_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")
OTHER_TORCH_DEVICES = ("mps", "xpu", "xla", "meta", "hip", "hpu", "ipu", "mtia", "maia", "lazy", "vulkan", "ve")


def torch_device(option: str, name) -> str:
    """A torch device this machine has: cpu, or cuda[:N] for an existing GPU. Checked without importing torch
    where this machine has no GPU driver (runtime/devices.py counts the GPUs)."""
    from .devices import cuda_device_count

    if not isinstance(name, str):
        raise TypeError(f"{option} must be text like 'cpu' or 'cuda:0'; got {name!r} ({_kind(name)})")
    match = _TORCH_DEVICE.match(name)
    if match is None:
        if name.split(":")[0] in OTHER_TORCH_DEVICES:
            raise ValueError(f"{option} {name!r}: Tandem runs on cpu or cuda devices")
        raise ValueError(f"{option} {name!r} is not a device; use cpu or cuda (cuda:N for GPU N)")
    kind, index = match.groups()
    if kind == "cpu" and index is not None:
        raise ValueError(f"{option} {name}: the CPU is one device, without a number; use cpu (for N CPU workers: "
                         "--devices cpu:N)")
    count = cuda_device_count() if kind == "cuda" else 0
    if kind == "cuda" and int(index or 0) >= count:
        have = "no CUDA device" if count == 0 else f"{count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        raise ValueError(f"{option} {name}: this machine has {have}; use --device cpu or an existing GPU")
    return name


def available_bytes(device: str = "cpu") -> int:
    """Memory free for a job now: on a GPU, what torch says is free; else the host's available RAM."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        import psutil
    except ImportError:
        return 1 << 62  # no way to tell: assume it fits
    return psutil.virtual_memory().available


def fits_in_memory(what: str, needed: int, device: str = "cpu", fix: str = "ask for less") -> None:
    """Refuses a job whose estimated memory (`needed` bytes, a lower bound) exceeds what `device` has free."""
    free = available_bytes(device)
    if needed > free:
        raise ValueError(f"{what} needs at least {needed / 2**30:.1f} GiB of memory, more than the "
                         f"{free / 2**30:.1f} GiB available on {device}; {fix}")


LATENT_COPIES = 8  # noise, latents, scaled input, the [uncond; cond] input, predictions, the scheduler's state
FEATURE_COPIES = 4  # feature maps of a network's widest level alive at once


def sampling_bytes(rows: int, latent: int, features: int, itemsize: int) -> int:
    """A lower bound of the memory `rows` rows of a sampler loop hold: per row its latents (`latent` float32
    elements, LATENT_COPIES times) and the denoiser's widest feature maps (`features` elements of `itemsize`
    bytes, FEATURE_COPIES at once). Attention and the weights come on top."""
    return rows * (LATENT_COPIES * latent * 4 + FEATURE_COPIES * features * itemsize)


def listen_host(option: str, host) -> str:
    """A host name or address this machine can listen on (tried by binding a socket to a free port of it)."""
    import socket

    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"{option} needs an address to listen on, e.g. 127.0.0.1; got {host!r}")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"{option} {host!r} is not an address this machine can resolve ({exc}); use 127.0.0.1, "
                         "0.0.0.0 or one of its own addresses") from None
    try:
        with socket.socket(family, kind) as probe:
            probe.bind(address[:2] if family == socket.AF_INET else address)
    except OSError as exc:
        raise ValueError(f"{option} {host}: this machine cannot listen there ({exc.strerror or exc}); use 127.0.0.1, "
                         "0.0.0.0 or one of its own addresses") from None
    return host
