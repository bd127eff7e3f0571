"""The part of a tensor a worker keeps of a model cut as it loads, and the reading of only those bytes from a
safetensors file (safetensors' `safe_open`: a tensor's slice is read from its byte range, nothing else).

A cut says what each rank keeps before any weight is read (engine/weights.py `reads`: a tensor cut's rows or
columns, `Slices`; a shard cut's run of a parameter's elements laid end to end, `Span`); the worker reads those
parts (`read`), unpickles the skeleton around them (cache_format.join_tensors), and the cut binds them: a tensor
read in part carries its Part (`PART`) until the cut takes it, and `check_bound` refuses a model in which one was
left, so a part is never computed on as if it were the whole tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PART = "_tandem_part"  # the attribute a tensor read in part carries until its cut takes it


@dataclass(frozen=True)
class Slices:
    """Of a tensor of `shape`, the indices `ranges` ((start, stop), ...) of dimension `dim` (0: rows, 1: columns),
    joined in that order."""

    shape: tuple[int, ...]
    dim: int
    ranges: tuple[tuple[int, int], ...]

    def numel(self) -> int:
        kept = sum(stop - start for start, stop in self.ranges)
        return kept * math.prod(self.shape) // self.shape[self.dim] if self.shape[self.dim] else 0


@dataclass(frozen=True)
class Span:
    """Of a tensor of `shape`, its elements [start, stop) laid end to end (row-major), as one flat tensor."""

    shape: tuple[int, ...]
    start: int
    stop: int

    def numel(self) -> int:
        return self.stop - self.start


def ranges_of(index) -> tuple[tuple[int, int], ...]:
    """A slice, or increasing indices (a tensor or a list), as its runs of consecutive indices."""
    if isinstance(index, slice):
        return ((index.start, index.stop),)
    runs: list[list[int]] = []
    for i in (int(v) for v in index):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return tuple((start, stop) for start, stop in runs)


def read(path, parts: dict) -> tuple[dict, int]:
    """({name: tensor}, bytes read) of the safetensors file `path`: every tensor whole, except those `parts` names
    ({name: Slices | Span}), of which only the part is read; those carry their part as PART. Raises ValueError for
    a file safetensors cannot read, or a part that does not fit its tensor's shape."""
    from safetensors import SafetensorError, safe_open

    tensors, nbytes = {}, 0
    try:
        with safe_open(str(path), framework="pt") as source:
            for name in source.keys():
                tensors[name], size = read_one(source, name, parts.get(name))
                nbytes += size
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"not a readable safetensors file ({exc})") from None
    missing = sorted(set(parts) - set(tensors))
    if missing:
        raise ValueError(f"the tensors file lacks {missing[:3]}, which the cut keeps")
    return tensors, nbytes


def read_one(source, key: str, part) -> tuple[object, int]:
    """(tensor, bytes read) of `key` of an open safetensors file (safe_open's handle): whole where `part` is None,
    else only its part, which then carries it (PART). Raises ValueError for a part that does not fit its shape."""
    import torch

    if part is None:
        value = source.get_tensor(key)
        return value, value.numel() * value.element_size()
    sliced = source.get_slice(key)
    if tuple(sliced.get_shape()) != tuple(part.shape):
        raise ValueError(f"{key} has shape {tuple(sliced.get_shape())}, not the {tuple(part.shape)} its cut was "
                         "planned for")
    if isinstance(part, Slices):
        pieces = _read_slices(sliced, part)
        value = torch.cat(pieces, dim=part.dim) if len(pieces) > 1 else pieces[0]
    else:
        pieces = [_read_span(source, sliced, key, part)]
        value = pieces[0].reshape(-1)
        skip = part.start - _first_row(part) * _row(part.shape)
        value = value[skip:skip + part.numel()].clone() if value.numel() != part.numel() else value
    setattr(value, PART, part)
    return value, sum(p.numel() * p.element_size() for p in pieces)


def _read_slices(sliced, part: Slices) -> list:
    if part.dim == 0:
        return [sliced[start:stop] for start, stop in part.ranges]
    return [sliced[:, start:stop] for start, stop in part.ranges]


def _row(shape) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def _first_row(part: Span) -> int:
    return part.start // _row(part.shape)


def _read_span(source, sliced, name: str, part: Span):
    """The rows of the tensor that hold elements [start, stop) (at most a row before and after them more)."""
    if not part.shape:  # a 0-d tensor: whole or nothing
        return source.get_tensor(name).reshape(1)[:part.numel()]
    row = _row(part.shape)
    first = _first_row(part)
    last = max(first, -(-part.stop // row))
    return sliced[first:last]


def check_bound(module) -> None:
    """Raises RuntimeError naming the first weight of `module` still read in part (its cut did not take it)."""
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        if getattr(tensor, PART, None) is not None:
            raise RuntimeError(f"{name} was read in part ({getattr(tensor, PART)}) but no cut of this worker took "
                               "it: the host's plan of what each rank reads and the worker's cut disagree")


def take(tensor, part):
    """The part of an in-memory tensor (`tensor` whole), as a contiguous tensor of its own: what `read` gives of
    it from a file (the host's side of a cut sent to another machine)."""
    import torch

    data = tensor.detach().to("cpu")
    if isinstance(part, Span):
        return data.reshape(-1)[part.start:part.stop].clone()
    pieces = [data.narrow(part.dim, start, stop - start) for start, stop in part.ranges]
    return torch.cat(pieces, dim=part.dim).contiguous() if len(pieces) > 1 else pieces[0].contiguous().clone()


def mark(tensors: dict, parts: dict) -> dict:
    """`tensors` ({name: tensor}, a cut's entry as a file holds it: each part a tensor of its own) with each part
    carrying its Part (PART). Raises ValueError for a part whose tensor is missing or of another size."""
    for name, part in parts.items():
        tensor = tensors.get(name)
        if tensor is None or tensor.numel() != part.numel() or tensor.shape != _kept_shape(part):
            raise ValueError(f"the tensors file holds {name!r} as {None if tensor is None else tuple(tensor.shape)}, "
                             f"not as its cut's part {part}")
        setattr(tensor, PART, part)
    return tensors


def _kept_shape(part) -> tuple:
    if isinstance(part, Span):
        return (part.numel(),)
    kept = sum(stop - start for start, stop in part.ranges)
    return tuple(kept if d == part.dim else size for d, size in enumerate(part.shape))


def cut_hash(weights_hash: str, family: str, tensors: dict, parts: dict) -> str:
    """sha256 naming a cut of a model in another machine's weights cache: the whole model's weights_hash, its
    family, each part, and every tensor's name, dtype, shape and bytes as the cut's entry holds them (`tensors`:
    each part a tensor of its own). Computed alike by the host, from what it sends, and by the machine, from
    what it received."""
    import hashlib

    import torch

    digest = hashlib.sha256(f"cut|{weights_hash}|{family}".encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(repr((name, str(tensor.dtype), tuple(tensor.shape), parts.get(name))).encode())
        flat = tensor.detach().as_subclass(torch.Tensor).contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    return digest.hexdigest()
