"""Weights a worker reads from the safetensors file the host loaded them from, instead of a copy the host writes.

The host's own write (shipping.write) is a second copy of the weights in RAM (/dev/shm) beside the host's: for a
28 GB model on a 64 GB machine that decides whether it runs at all. Where the host's weights came from safetensors
files (a host surface says which: `note`, or a recipe's `sources`), a weight is read from them only where the host
can show its bytes equal the file's:
- the tensor matches: a file key equals the weight's name, or is one prefix (the one most names share, such as
  ComfyUI's `model.diffusion_model.`) plus it; the same shape; the same dtype, or both floating point (the worker
  casts with `.to`, as loaders do); a plain tensor held under that name alone (cache_format.plain);
- its content matches: the host computes `digest` of exactly the part each worker reads (tensor_parts), on its own
  memory, and sends it in the Load; the worker computes it of what it read and cast, and refuses the load
  (`SourceRefused`, one sentence) on any difference; the host then writes the model as before (pool.py).
A weight changed after loading (a merged LoRA, a fused projection) fails the content check and takes the written
path; so does a file changed or cut short since.

`digest` is two sums over the part's bytes as 64-bit words w_j, mod 2^64: sum(w_j) and sum((j + 1) * w_j), per
block of rows of about BLOCK_BYTES, folded in block order. torch's int64 sums are vectorised reductions (and run on
a GPU's memory where the host's weights are, with no copy to the CPU), and wrap on overflow alike on the CPU and
CUDA, so both ends compute the same residues. Measured on one core of this 2-core machine while others ran: 1.0 to
1.2 GB/s for the digest of a 256 MiB tensor, 0.3 GB/s for hashlib's sha256 of the same bytes. The threat is a changed weight,
not an adversary (the file is on the host's own disk, read by the host's own workers): any changed word changes
the first sum, any two swapped words the second, so a cryptographic hash buys nothing here.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

BLOCK_BYTES = 16 << 20  # a digest block: bounds the copy a non-contiguous part costs while it is summed
_WORDS_PER_ROW = 1024  # a block's words summed as rows and columns of this width (the second sum's weights)
_MASK = (1 << 64) - 1
_FOLD = 0x9E3779B97F4A7C15  # odd: folding the blocks in order keeps every block's sums in the result

_NOTED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # module -> files its weights came from


class SourceRefused(ValueError):
    """A worker cannot take a weight from the host's source file (unreadable, or its bytes differ): the host
    writes the model instead."""


@dataclass(frozen=True)
class SourceRead:
    """Read weight `key` of safetensors file `file`, cast to `dtype` (torch's name, e.g. "float16"); `digest`: the
    host's digest of the part the worker reads."""

    file: str
    key: str
    dtype: str
    digest: tuple[int, int]


def note(module, files) -> None:
    """Says that `module`'s weights were loaded from the safetensors `files` (a host surface's knowledge)."""
    _NOTED[module] = tuple(str(f) for f in files)


def files_of(payload) -> tuple[str, ...]:
    """The safetensors files a payload's weights were loaded from: a recipe's `sources`, or a module's `note`."""
    from .recipe import Recipe

    if isinstance(payload, Recipe):
        return tuple(payload.sources)
    return _NOTED.get(payload, ())


def _index(files) -> dict:
    """{key: [(file, dtype, shape), ...]} of the tensors of `files` (headers only; a key held by several files, a
    variant's beside the plain one, once per file); a file that does not read is left out (its weights are written
    instead)."""
    from safetensors import SafetensorError, safe_open

    found = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as source:
                for key in source.keys():
                    sliced = source.get_slice(key)
                    found.setdefault(key, []).append((str(path), sliced.get_dtype(), tuple(sliced.get_shape())))
        except (SafetensorError, OSError):
            continue
    return found


def matches(tensors: dict, files) -> dict[str, tuple[str, str]]:
    """{weight name: (file, key)} of the weights of `tensors` ({name: tensor}, each held under that name alone)
    that `files` hold under their name or the prefix most of them share, of the same shape and a dtype the
    worker casts to the weight's."""
    from .cache_format import plain

    index = _index(files)
    if not index:
        return {}
    prefixes: dict[str, int] = {}
    for key in index:
        cuts = [0] + [at + 1 for at, letter in enumerate(key) if letter == "."]
        for cut in cuts:  # the key as a prefix and one of the weights' names
            if key[cut:] in tensors:
                prefixes[key[:cut]] = prefixes.get(key[:cut], 0) + 1
    if not prefixes:
        return {}
    prefix = max(sorted(prefixes, key=len), key=prefixes.get)  # the most names; the shorter on a tie
    found = {}
    for name, tensor in tensors.items():
        if not plain(tensor):
            continue
        entries = [e for e in index.get(prefix + name, ()) if e[2] == tuple(tensor.shape) and _castable(e[1], tensor)]
        if entries:  # the file of the host's dtype first: nothing to cast
            entries.sort(key=lambda e: _dtype(e[1]) != tensor.dtype)
            found[name] = (entries[0][0], prefix + name)
    return found


def _castable(file_dtype: str, tensor) -> bool:
    """The worker casts a tensor the file holds as `file_dtype` (safetensors' name, e.g. "BF16") to `tensor`'s
    dtype as a loader would: the same dtype, or floating point to floating point."""
    held = _dtype(file_dtype)
    return held is not None and (held == tensor.dtype or (held.is_floating_point and tensor.dtype.is_floating_point))


# safetensors' dtype names (its format's header) -> torch's; the library keeps its own table private
FILE_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
               "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16", "BF16": "bfloat16",
               "F32": "float32", "F64": "float64", "C64": "complex64", "F8_E4M3": "float8_e4m3fn",
               "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
               "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz"}


def _dtype(file_dtype: str):
    """torch's dtype of safetensors' name for it (None: one torch lacks, or a name outside the table)."""
    import torch

    return getattr(torch, FILE_DTYPES.get(file_dtype, ""), None)


def reads(tensors: dict, found: dict, parts: dict[int, dict | None]) -> dict[int, dict]:
    """{rank: {name: SourceRead}}: what each rank (`parts`: rank -> what its cut keeps of each weight, or None)
    reads of the weights `found` (matches) of `tensors`, each with the host's digest of its part."""
    whole: dict = {}
    out = {}
    for rank, kept in parts.items():
        kept = kept or {}
        out[rank] = {}
        for name, (file, key) in found.items():
            part = kept.get(name)
            if part is None and name not in whole:
                whole[name] = digest(tensors[name])
            value = whole[name] if part is None else digest(tensors[name], part)
            out[rank][name] = SourceRead(file, key, str(tensors[name].dtype).removeprefix("torch."), value)
    return out


def digest(tensor, part=None) -> tuple[int, int]:
    """(sum of words, sum of (position + 1) x word), mod 2^64 each, of the bytes of `part` of `tensor`
    (tensor_parts Slices or Span; None: the whole tensor), as the part reads when joined (a Slices' pieces
    concatenated; a Span flat), in blocks of rows folded in order (see the module's docstring)."""
    total = (0, 0)
    for block in _blocks(tensor.detach(), part):
        first, second = _block_sums(block)
        total = ((total[0] * _FOLD + first) & _MASK, (total[1] * _FOLD + second) & _MASK)
    return total


def _blocks(tensor, part):
    """The rows of the part, as joined, in blocks of about BLOCK_BYTES: a row is one index of the first dimension
    (an element, for a Span or a 1-d tensor), so a part and the tensor a worker reads of it give the same blocks."""
    from .tensor_parts import Span

    if tensor.dim() == 0 or isinstance(part, Span):
        flat = tensor.reshape(-1)
        pieces = [flat if part is None else flat[part.start:part.stop]]
    elif part is None:
        pieces = [tensor]
    elif part.dim == 0:
        pieces = [tensor[start:stop] for start, stop in part.ranges]
    else:  # a later dimension's ranges: each row of the tensor joins them
        pieces = [_Joined(tensor, part)]
    count = sum(p.shape[0] for p in pieces)
    kept = part.numel() if part is not None else tensor.numel()
    row_bytes = max(1, kept // count * tensor.element_size()) if count else 1
    step = max(1, BLOCK_BYTES // row_bytes)
    for start in range(0, count, step):
        yield _rows(pieces, start, min(count, start + step))


class _Joined:
    """A tensor's rows with only the ranges of a later dimension kept (tensor_parts Slices), joined per row."""

    def __init__(self, tensor, part):
        self.tensor, self.part, self.shape = tensor, part, tensor.shape

    def __getitem__(self, rows: slice):
        import torch

        chosen = [self.tensor[rows].narrow(self.part.dim, a, b - a) for a, b in self.part.ranges]
        return torch.cat(chosen, dim=self.part.dim) if len(chosen) > 1 else chosen[0]


def _rows(pieces, start: int, stop: int):
    """Rows [start, stop) of the pieces laid one after the other, as one tensor."""
    import torch

    out, offset = [], 0
    for rows in pieces:
        lo, hi = max(start, offset), min(stop, offset + rows.shape[0])
        if lo < hi:
            out.append(rows[lo - offset:hi - offset])
        offset += rows.shape[0]
    return torch.cat(out) if len(out) > 1 else out[0]


def _block_sums(block) -> tuple[int, int]:
    """(sum w_j, sum (j + 1) w_j) mod 2^64 of a block's bytes as little-endian 64-bit words (the last, short word
    padded with zeros)."""
    import torch

    data = block.contiguous().reshape(-1).view(torch.uint8)
    if data.storage_offset() % 8 or data.numel() % 8:
        padded = torch.zeros(-(-data.numel() // 8) * 8, dtype=torch.uint8, device=data.device)
        padded[:data.numel()] = data
        data = padded
    words = data.view(torch.int64)
    width = _WORDS_PER_ROW
    body = words.numel() // width * width
    first = second = 0
    if body:
        grid = words[:body].view(-1, width)
        rows, columns = grid.sum(1), grid.sum(0)
        first = int(rows.sum())
        row_at = torch.arange(rows.numel(), dtype=torch.int64, device=rows.device)
        column_at = torch.arange(1, width + 1, dtype=torch.int64, device=rows.device)
        second = int((rows * row_at).sum()) * width + int((columns * column_at).sum())
    if body < words.numel():
        tail = words[body:]
        at = torch.arange(body + 1, words.numel() + 1, dtype=torch.int64, device=tail.device)
        first += int(tail.sum())
        second += int((tail * at).sum())
    return first & _MASK, second & _MASK


def read(sources: dict, parts: dict) -> tuple[dict, int]:
    """({name: tensor}, bytes read) of the weights `sources` names ({name: SourceRead}), only the part `parts`
    names of each ({name: tensor_parts part}; those carry it), each cast to the host's dtype and checked against
    the host's digest. Raises SourceRefused, one sentence, for a file that does not read or a weight whose bytes
    differ from the host's."""
    import torch
    from safetensors import SafetensorError, safe_open

    from .tensor_parts import PART, read_one

    by_file: dict[str, list] = {}
    for name, source in sources.items():
        by_file.setdefault(source.file, []).append(name)
    tensors, nbytes = {}, 0
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt") as opened:
                for name in names:
                    source, part = sources[name], parts.get(name)
                    value, read_bytes = read_one(opened, source.key, part)
                    dtype = getattr(torch, source.dtype)
                    if value.dtype != dtype:
                        value = value.to(dtype)
                        if part is not None:
                            setattr(value, PART, part)
                    if digest(value) != source.digest:
                        raise SourceRefused(f"{name} as {file} holds it differs from the host's copy (changed after "
                                            "loading, e.g. a merged LoRA, or the file changed since)")
                    tensors[name], nbytes = value, nbytes + read_bytes
        except (SafetensorError, OSError, ValueError) as exc:
            if isinstance(exc, SourceRefused):
                raise
            raise SourceRefused(f"the model's file {file} cannot be read ({exc})") from None
    return tensors, nbytes
