"""Model shipping: which weights the workers hold (a fingerprint) and how a model reaches them.

What travels is a model's payload: the module itself, pickled whole (diffusers models, the bench's and the
digits model), or a recipe.Recipe (a host whose classes cannot be pickled by reference, such as ComfyUI's:
the workers build the module with the host's code and load its weights).

A worker on the GPU that holds the host's copy maps that copy through CUDA IPC (no second copy on that
device); every other worker of this machine reads the one safetensors file and skeleton the host writes once (in
shared memory where the platform has it; cache_format.py), a worker whose Load cuts the model only the parts it
keeps (tensor_parts.py); a worker of another machine loads the entry its machine's weights cache holds under the
weights' content hash (weights_hash; remote_weights.py sends it there once, as a safetensors file of its tensors
and a skeleton of the rest: cache_format.py), or, for workers that keep a cut of it, the entry of only that cut.
"""

from __future__ import annotations

import hashlib
import itertools
import weakref
from collections import OrderedDict
from pathlib import Path

from .carry import CannotCarry
from .messages import Load
from .recipe import Recipe, tensor_bytes

_TENSOR_LISTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_WEIGHTS_HASHES: OrderedDict = OrderedDict()  # fingerprint -> weights_hash, the most recently used last
_WEIGHTS_HASHES_KEPT = 32


def model_fingerprint(module, family: str) -> str:
    """Identity + weights' storage, dtype, shape and version counter: changes when the model or its weights
    do (an in-place LoRA merge bumps the version counters), stays the same across calls and jobs otherwise.

    The module's tensor list is walked once and cached (a walk costs ~ms per call on a UNet); a parameter
    replaced by a new tensor object after that is therefore not seen: replace weights in place, or clone.
    """
    tensors = _TENSOR_LISTS.get(module)
    if tensors is None:
        tensors = _TENSOR_LISTS[module] = list(itertools.chain(module.named_parameters(), module.named_buffers()))
    digest = hashlib.sha256(f"{family}|{type(module).__module__}.{type(module).__qualname__}|{id(module)}".encode())
    digest.update(repr([(name, str(t.dtype), tuple(t.shape), t.data_ptr(), _version(t)) for name, t in tensors]).encode())
    return digest.hexdigest()


def _version(t) -> int:
    """A tensor's version counter; -1 for an inference tensor, which keeps none (ComfyUI loads VAEs under
    inference mode): only its storage then tells a change."""
    return -1 if t.is_inference() else t._version


def model_bytes(payload) -> int:
    """The bytes of a payload's weights and buffers (a module's state dict, or a recipe's weights)."""
    if isinstance(payload, Recipe):
        return payload.nbytes
    return sum(t.numel() * t.element_size() for t in payload.state_dict().values())


def _tensors(payload):
    """(name, tensor) of a payload's weights."""
    return payload.weights.items() if isinstance(payload, Recipe) else payload.state_dict().items()


# Part of every weights hash: a cache entry's skeleton (cache_format.py) names the payload's classes by module
# path. Bumped when those paths move (v2: recipe.py moved to runtime/), so entries written before are missed and
# evicted in time instead of failing to load. (The move from torch.save images to safetensors + skeleton changed
# the files' names, HASH.pt to HASH.safetensors and HASH.skeleton, so it needed no bump.)
CACHE_LAYOUT = "v2"


def weights_hash(payload, family: str) -> str:
    """sha256 of what a model is, independent of any process: its family, class (a recipe: its identity), and
    each weight's name, dtype, shape and bytes. Names a model in another machine's weights cache, across host
    restarts. Reads every byte of the weights: see cached_weights_hash."""
    import torch

    what = (f"recipe {payload.identity}" if isinstance(payload, Recipe)
            else f"{type(payload).__module__}.{type(payload).__qualname__}")
    digest = hashlib.sha256(f"{CACHE_LAYOUT}|{family}|{what}".encode())
    for name, tensor in _tensors(payload):
        if not isinstance(tensor, torch.Tensor):  # a module's extra state: its type only (its repr may hold ids)
            digest.update(repr((name, type(tensor).__qualname__)).encode())
            continue
        flat = tensor.detach().as_subclass(torch.Tensor).to("cpu").contiguous().reshape(-1)
        digest.update(repr((name, str(tensor.dtype), tuple(tensor.shape))).encode())
        digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    return digest.hexdigest()


def cached_weights_hash(module, family: str, fingerprint: str) -> str:
    """weights_hash, computed once per fingerprint in this process (a changed model has a new fingerprint, so
    an in-place LoRA merge is hashed again)."""
    if fingerprint not in _WEIGHTS_HASHES:
        _WEIGHTS_HASHES[fingerprint] = weights_hash(module, family)
        while len(_WEIGHTS_HASHES) > _WEIGHTS_HASHES_KEPT:
            _WEIGHTS_HASHES.popitem(last=False)
    _WEIGHTS_HASHES.move_to_end(fingerprint)
    return _WEIGHTS_HASHES[fingerprint]


def write(payload, stem: Path, leave: frozenset = frozenset()) -> tuple[Path, ...]:
    """Writes a payload (a module or its recipe) as the workers of this machine read it: `STEM.safetensors`, its
    tensors but those named in `leave` (read from their source file: sources.py; no file where that leaves none),
    and `STEM.skeleton`, the rest (cache_format.py, pickled with host_modules' pickler: a recipe's overrides may be
    closures, a host's custom-node classes are named by their file). Returns the files written, the skeleton last.
    Raises CannotCarry for a payload that does not pickle; nothing half-written stays."""
    from safetensors.torch import save_file

    from .cache_format import split

    files = (stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".skeleton"))
    try:
        skeleton, tensors = split(payload, leave)
        if tensors or not leave:
            save_file(tensors, str(files[0]))
        files[1].write_bytes(skeleton)
    except BaseException as exc:
        for path in files:
            path.unlink(missing_ok=True)  # nothing half-written stays in the pool's folder
        if isinstance(exc, Exception):  # e.g. an object in the model that does not pickle
            raise CannotCarry(f"the model cannot be written for the workers ({type(exc).__name__}: {exc})") from exc
        raise
    return tuple(path for path in files if path.exists())


def source_reads(payload, workers, parts: dict) -> dict[int, dict]:
    """{rank: {name: sources.SourceRead}} for the workers (objects with .rank and .device) of this machine that
    copy the model (not the host's GPU's, nor another machine's): the weights they read from the files the host
    loaded them from (sources.files_of) rather than from the host's write, each with the host's digest of its
    part (parts: rank -> worker_parts' parts). Empty where the payload names no such file or none matches."""
    from . import sources

    files = sources.files_of(payload)
    host_gpu = _only_cuda_device(payload)
    ranks = [w.rank for w in workers if w.device != host_gpu and "/" not in w.device]
    if not files or not ranks:
        return {}
    tensors, holders = _tensor_holders(payload)
    alone = {name: t for name, t in tensors.items()
             if _storage_key(t) is not None and holders[_storage_key(t)] == 1}  # a tied weight is written
    found = sources.matches(alone, files)
    return sources.reads(alone, found, {rank: parts.get(rank) for rank in ranks}) if found else {}


def worker_parts(payload, workers, cuts: dict | None, reads) -> dict[int, dict]:
    """{rank: {tensor name: tensor_parts part}} for the workers (objects with .rank and .device) whose cut
    (cuts: rank -> messages.Load.cut) says what they keep of each weight (reads: cut -> engine/weights.py
    `reads` of the host's module): what each reads of the host's file, or what its machine's cache is sent. A
    worker that maps the host's CUDA memory takes the whole model (nothing is read)."""
    if reads is None or not cuts:
        return {}
    host_gpu = _only_cuda_device(payload)
    tensors, holders = _tensor_holders(payload)  # once for every worker's parts
    found = {}
    for worker in workers:
        cut = cuts.get(worker.rank)
        if cut is not None and worker.device != host_gpu:
            parts = _parts(tensors, holders, reads(cut))
            if parts:
                found[worker.rank] = parts
    return found


def load_requests(payload, family: str, fingerprint: str, workers, folder: Path, keep: tuple[str, ...] = (),
                  nbytes: int = 0, cached: dict | None = None, modules: dict | None = None, cuts: dict | None = None,
                  parts: dict | None = None, sources: dict | None = None) -> tuple[dict, tuple[Path, ...], int]:
    """The Load message of every worker (objects with .rank and .device), the files written for the workers
    that copy (none if none does; the caller removes them once they have loaded) and the bytes of weights written.
    payload: the module, or its recipe; keep: the models the workers keep beside this one; nbytes: its size
    (see messages.Load); cached: rank -> the entry under which each worker of another machine finds what it loads
    in its machine's cache (already sent there: remote_weights.send_to_machines); modules: the host modules
    the workers import by file (host_modules.py); cuts: rank -> the cut its worker makes before the weights reach
    its device (messages.Load.cut); parts: rank -> what its cut keeps of each weight (worker_parts): a worker of
    this machine reads only those parts of the file (a recipe's too: its build takes them in place,
    recipe.Recipe.make), another machine's loads a cache entry that holds only them; sources: rank -> the weights
    its worker reads from their source file (source_reads; the same names for every copying worker), which the
    host then does not write."""
    host_gpu = _only_cuda_device(payload)
    sharing = {w.rank for w in workers if w.device == host_gpu}
    remote = {w.rank for w in workers if "/" in w.device}  # another machine's: it loads from that machine's cache
    copying = {w.rank for w in workers} - sharing - remote
    cached, cuts, parts, sources = cached or {}, cuts or {}, parts or {}, sources or {}
    if remote - set(cached):
        raise ValueError("workers of other machines load from their machine's weights cache: pass `cached`")
    files, shipped, modules = (), 0, modules or {}
    common = dict(keep=keep, bytes=nbytes, modules=modules)
    requests = {rank: Load(fingerprint, family, cached=cached[rank], cut=cuts.get(rank), parts=parts.get(rank),
                           **common) for rank in remote}
    if copying:
        read = [sources.get(rank) or {} for rank in copying]
        leave = frozenset(read[0]) if all(set(r) == set(read[0]) for r in read) else frozenset()
        files = write(payload, folder / f"model-{fingerprint[:16]}", leave)
        shipped += model_bytes(payload) - sum(tensor_bytes(t) for name, t in _tensors(payload) if name in leave)
        requests.update({rank: Load(fingerprint, family, path=str(files[0]), cut=cuts.get(rank), parts=parts.get(rank),
                                    sources=sources.get(rank) if leave else None, **common) for rank in copying})
    if sharing:
        shared = _share_cuda(payload)
        requests.update({rank: Load(fingerprint, family, shared=shared, cut=cuts.get(rank), **common)
                         for rank in sharing})
    return requests, files, shipped


def _tensor_holders(payload) -> tuple[dict, dict]:
    """(name -> tensor of the payload's file, storage -> how many of those names hold it)."""
    tensors = dict(_tensors(payload))
    holders: dict = {}
    for tensor in tensors.values():
        holders[_storage_key(tensor)] = holders.get(_storage_key(tensor), 0) + 1
    return tensors, holders


def _parts(tensors: dict, holders: dict, parts: dict | None) -> dict | None:
    """`parts` where each names a plain tensor of the payload's file (`tensors`: name -> tensor) of that whole
    shape, held under that name alone (`holders`: storage -> how many names hold it; a recipe's weights are its
    state dict, which may hold a quantized weight's data; a state dict holds a tied weight under each of its names,
    and a recipe loads them as copies); else None: the worker reads the whole model and cuts it (tied weights:
    modules and recipes alike)."""
    from .cache_format import plain

    if not parts:
        return parts
    for name, part in parts.items():
        tensor = tensors.get(name)
        if tensor is None or not plain(tensor) or tuple(tensor.shape) != tuple(part.shape) \
                or (_storage_key(tensor) is not None and holders[_storage_key(tensor)] > 1):
            return None
    return parts


def _storage_key(tensor):
    """Where a tensor's data starts (None: no data, or not a tensor)."""
    if not hasattr(tensor, "untyped_storage") or tensor.device.type == "meta" or not tensor.numel():
        return None
    return str(tensor.device), tensor.untyped_storage().data_ptr(), tensor.storage_offset()


def _only_cuda_device(payload) -> str | None:
    """"cuda:N" when every weight of `payload` is on that one CUDA device, else None."""
    devices = {t.device for _, t in _tensors(payload) if hasattr(t, "device")}
    if len(devices) != 1:
        return None
    device = devices.pop()
    return f"cuda:{device.index}" if device.type == "cuda" else None


def _share_cuda(payload) -> bytes:
    """`payload` pickled with CUDA IPC handles instead of its weights: a process on the same GPU that unpickles
    it maps the host's memory (torch keeps that memory alive until every such process has let go). A recipe is
    pickled with cloudpickle (its patches may be closures), with torch's tensor reductions put first."""
    import io
    from collections import ChainMap
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's tensor reductions with ForkingPickler)

    buffer = io.BytesIO()
    if isinstance(payload, Recipe):
        from .host_modules import host_pickler

        base = host_pickler()

        class SharingPickler(base):  # the C pickler reads its dispatch table once, from the class
            dispatch_table = ChainMap(ForkingPickler._extra_reducers, base.dispatch_table)

        SharingPickler(buffer).dump(payload)
    else:
        ForkingPickler(buffer).dump(payload)
    return buffer.getvalue()
