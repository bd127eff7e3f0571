"""Model shipping: which weights the workers hold (a fingerprint) and how a model reaches them.

A worker on the GPU that holds the host's copy maps that copy through CUDA IPC (no second copy on that
device); every other worker of this machine maps one file the host writes once (in shared memory where the
platform has it); a worker of another machine loads the file its machine's weights cache holds under the
weights' content hash (weights_hash; remote_weights.py sends it there once).
"""

from __future__ import annotations

import hashlib
import itertools
import weakref
from collections import OrderedDict
from pathlib import Path

from .messages import Load

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
    digest.update(repr([(name, str(t.dtype), tuple(t.shape), t.data_ptr(), t._version) for name, t in tensors]).encode())
    return digest.hexdigest()


def model_bytes(module) -> int:
    """The bytes of a module's weights and buffers."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def weights_hash(module, family: str) -> str:
    """sha256 of what a model is, independent of any process: its family, class, and each state_dict entry's
    name, dtype, shape and bytes. Names a model in another machine's weights cache, across host restarts.
    Reads every byte of the weights: see cached_weights_hash."""
    import torch

    digest = hashlib.sha256(f"{family}|{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, tensor in module.state_dict().items():
        if not isinstance(tensor, torch.Tensor):  # a module's extra state: its type only (its repr may hold ids)
            digest.update(repr((name, type(tensor).__qualname__)).encode())
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
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


def torch_save_image(module):
    """`module`'s torch.save image as a uint8 tensor (sent as raw bytes on a channel)."""
    import io

    import torch

    image = io.BytesIO()
    torch.save(module, image)
    return torch.frombuffer(bytearray(image.getbuffer()), dtype=torch.uint8)


def load_requests(module, family: str, fingerprint: str, workers, folder: Path, keep: tuple[str, ...] = (),
                  nbytes: int = 0, cached: str | None = None) -> tuple[dict, Path | None, int]:
    """The Load message of every worker (objects with .rank and .device), the file written for the workers
    that copy (None if none does; the caller removes it once they have loaded) and the bytes it holds.
    keep: the models the workers keep beside this one; nbytes: its size (see messages.Load); cached: the
    weights_hash under which the workers of other machines find the model in their machine's cache (already
    sent there: remote_weights.send_to_machines)."""
    import torch

    host_gpu = _only_cuda_device(module)
    sharing = {w.rank for w in workers if w.device == host_gpu}
    remote = {w.rank for w in workers if "/" in w.device}  # another machine's: it loads from that machine's cache
    copying = {w.rank for w in workers} - sharing - remote
    if remote and cached is None:
        raise ValueError("workers of other machines load from their machine's weights cache: pass `cached`")
    path, shipped = None, 0
    requests = {rank: Load(fingerprint, family, cached=cached, keep=keep, bytes=nbytes) for rank in remote}
    if copying:
        path = folder / f"model-{fingerprint[:16]}.pt"
        torch.save(module, path)
        shipped += model_bytes(module)
    requests.update({rank: Load(fingerprint, family, path=str(path), keep=keep, bytes=nbytes) for rank in copying})
    if sharing:
        shared = _share_cuda(module)
        requests.update({rank: Load(fingerprint, family, shared=shared, keep=keep, bytes=nbytes) for rank in sharing})
    return requests, path, shipped


def _only_cuda_device(module) -> str | None:
    """"cuda:N" when every parameter and buffer of `module` is on that one CUDA device, else None."""
    devices = {t.device for t in itertools.chain(module.parameters(), module.buffers())}
    if len(devices) != 1:
        return None
    device = devices.pop()
    return f"cuda:{device.index}" if device.type == "cuda" else None


def _share_cuda(module) -> bytes:
    """`module` pickled with CUDA IPC handles instead of its weights: a process on the same GPU that unpickles
    it maps the host's memory (torch keeps that memory alive until every such process has let go)."""
    import io
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's tensor reductions with ForkingPickler)

    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(module)
    return buffer.getvalue()
