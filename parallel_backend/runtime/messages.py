"""Typed messages between the host and its workers (over transport.Channel). The worker runs one handler per
message type (engine/worker.py handlers(): the runtime's, model calls, each strategy's); every request is
answered by one `Reply`.

Messages are plain dataclasses of this package, so a worker unpickles nothing it does not know, and only
after the channel is authenticated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


# ---- handshake (worker -> host) ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Hello:
    rank: int
    pid: int


# ---- requests (host -> worker) -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Load:
    """Hold this model, from a file (`path`), the host's own GPU copy (`shared`: CUDA IPC) or, on another machine,
    the entry its weights cache holds under the content hash `cached` (weights_cache.py), besides the ones
    in `keep` (the host's choice of what stays loaded; every other model is dropped first). `bytes`: the
    weights' size, so a GPU worker short of memory drops the kept models too (its reply says what it holds).
    What is loaded is a module or a recipe.Recipe; `modules`: the host modules it names that a worker imports by
    file (host_modules.py). `cut`: (name, ...) where the model is held cut (a strategy's: tensor; "shard": sharded
weights), or several such cuts made in order: the worker cuts it on the host's side of the device, so the device
never holds the whole weights; `parts`: what the cut keeps of each weight, so that only those bytes of `path` are
read (tensor_parts.py), or, with `cached`, the parts its machine's cache entry of the cut holds. `sources`: {tensor
name: sources.SourceRead}, the weights read from the file the host loaded them from (checked against the host's
digest), not from `path`; `path` is then the skeleton itself where the host wrote no tensors file."""

    fingerprint: str
    family: str
    path: str | None = None
    shared: bytes | None = None
    keep: tuple[str, ...] = ()
    bytes: int = 0
    cached: str | None = None
    modules: dict = field(default_factory=dict)
    cut: Any = None  # a strategy's cut of the weights, made before they move to the device (WorkerState.cutters)
    parts: dict | None = None  # with `cut`: {tensor name: tensor_parts part}, the parts read (or cached) of them
    sources: dict | None = None  # {tensor name: sources.SourceRead}: read from the host's source file instead


@dataclass(frozen=True)
class HoldsWeights:
    """Another machine's worker: does your machine's weights cache hold `weights_hash` (its file checked against
    its digest)? Reply value: {"held": bool, "limit": the cache's bound in bytes, "removed": why the file was just
    removed (it failed its check), or None}. Asked of one worker per machine."""

    weights_hash: str


@dataclass(frozen=True)
class StoreWeights:
    """Another machine's worker: keep this model in your machine's weights cache under `weights_hash`, once it
    hashes to that value (of model family `family`): `skeleton`, everything but its tensors (bytes, pickled), and
    `blob`, its tensors' safetensors file (a uint8 tensor, raw bytes on the channel; cache_format.py). Sent to one
    worker per machine that lacks it; every worker of that machine then loads the cached entry. `modules`: the
    host modules the skeleton names (host_modules.py), registered before it is read. With `parts`, a cut of the
    model (only what that machine's workers keep), named by tensor_parts.cut_hash."""

    weights_hash: str
    family: str
    skeleton: bytes = b""
    blob: Any = None
    modules: dict = field(default_factory=dict)
    parts: dict | None = None  # a cut of the model: {name: tensor_parts part} its tensors hold
    whole_hash: str | None = None  # with parts: the whole model's weights_hash (tensor_parts.cut_hash)


@dataclass(frozen=True)
class Carry:
    """Keep these host objects of model calls (carry.py): digest -> cloudpickle bytes. `modules`: the host's
    modules a worker imports by file (host_modules.py), registered first."""

    blobs: dict
    modules: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Unload:
    """Drop the model with this fingerprint (None: every model)."""

    fingerprint: str | None = None


@dataclass(frozen=True)
class RunSetup:
    """Run function(argument) from a host-provided python file (e.g. to give a host library its settings)."""

    path: str
    function: str
    argument: Any = None


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class Forward:
    """Run the whole model on this ModelCall (a row share of the host's call)."""

    fingerprint: str
    call: Any  # calls.ModelCall


@dataclass(frozen=True)
class TimedForward:
    """Run the whole model on this ModelCall as Forward does, timed for auto's plan (engine/timing.py): the call,
    one row of it where it has more, and (`attentions`) every attention's shapes and seconds."""

    fingerprint: str
    call: Any  # calls.ModelCall
    attentions: bool = False


# ---- replies (worker -> host) ------------------------------------------------------------------------------

@dataclass
class Computed:
    """What a worker computed for one call: its output (None for a rank that returns none), the seconds of its
    own compute, the seconds it sat waiting on peers, and the bytes it sent to them."""

    out: Any = None
    compute_s: float = 0.0
    wait_s: float = 0.0
    bytes_sent: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class Reply:
    """The answer to one request. ok False: `error` (one line) and the worker's `traceback`.
    seconds: the request's time on the worker; peak_bytes: the worker's peak memory during the request
    (CUDA: max allocated since the request began; CPU: the process's peak resident set so far)."""

    ok: bool = True
    value: Any = None
    error: str = ""
    traceback: str = ""
    seconds: float = 0.0
    peak_bytes: int | None = None


# ---- a host and another machine's `tandem worker serve` (remote.py, serve.py) -------------------------------

@dataclass(frozen=True)
class Join:
    """Host -> serve daemon: start workers for my pool. devices: that machine's own names (cpu, cuda:N), for
    the global `ranks`; they connect to `connect` (HOST:PORT, TLS) with `authkey` and meet at `rendezvous`."""

    versions: dict
    connect: str
    authkey: bytes
    rendezvous: str
    ranks: tuple[int, ...]
    devices: tuple[str, ...]
    world: int
    pg_timeout: float


@dataclass(frozen=True)
class WorkerStatus:
    """One remote worker as its daemon sees it: exit code (None: running), seconds since its heartbeat, whether
    its process is stopped, and its log's last lines once it has ended."""

    code: int | None
    silent_s: float
    stopped: bool = False
    log_tail: str = ""


@dataclass(frozen=True)
class MachineStatus:
    """Serve daemon -> host, every STATUS_PERIOD_S: rank -> WorkerStatus."""

    workers: dict


@dataclass(frozen=True)
class KeepAlive:
    """Host -> serve daemon, every STATUS_PERIOD_S: the host is still there (a daemon that hears nothing for
    LINK_TIMEOUT_S stops the host's workers)."""


@dataclass(frozen=True)
class KillWorkers:
    """Host -> serve daemon: kill these ranks' processes now (the pool is tearing down)."""

    ranks: tuple[int, ...]
