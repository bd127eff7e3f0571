"""Sharded weights: each rank of a group keeps 1/N of every block's parameters and gathers a block's whole
weights just before the block runs, freeing them when it returns, so a rank holds about 1/N of the weights plus
the block that runs (two where the next block's gather is posted ahead).

The units that gather are the blocks (every child of a ModuleList, the top-most ModuleLists: a DiT's
transformer blocks, a UNet's down and up blocks) and, outside them, each module of at least `SMALL` parameters
that holds no ModuleList, whole (an embedder with its layers, an output head, a UNet's mid block): module code
may read a layer's parameters inside its parent's forward (diffusers' Wan reads its time embedder's dtype), so a
unit is the largest module that is called as one. A unit's parameters are laid end to end per dtype, padded to a multiple of
N; rank i keeps the i-th piece of each as a buffer of the unit (so it moves with the module). Parameters a
module registers on itself outside every unit (Flux's positional tables, Wan's head modulation) and small
modules stay whole on every rank: module code may read them without calling a layer, which no hook sees. So do
the parameters a tensor cut made this rank's own (`tensor_splits.own`): the group's ranks hold different ones,
and sharding divides only what they all hold (under tensor: the rest of each block, its modulation and norms).

What a rank keeps is known before any weight is read (`reads`: each parameter's run of elements in its unit's
pieces, from names and shapes), so a worker reads only that run of the host's file (runtime/tensor_parts.py) and
the cut takes it as it is (`_elements`); a weight read whole is cut here.

Every rank of the group must run every forward of the model, block for block: the engine gives a rank with no
rows of a call one row of it to run (engine/weights.py `fillers`). A unit's parameters are None while it
is not running, so code that reads one outside its block fails at once, naming it, instead of computing on
stale weights.

Hand-written, not torch's FSDP2 (`fully_shard`), for measured and structural reasons:
- on gloo, 8 blocks of a 512-wide MLP (8 MiB each) took 101.9 ms a call at 64 tokens under `fully_shard`
  against 54.5 ms with these gathers (whole: 24.3 ms), and 430 against 404 ms at 1024 tokens (whole: 240 ms);
  docs/measurements/fsdp2_vs_gather.py, 2 ranks, torch 2.13, the same outputs bit for bit;
- `fully_shard` turns each parameter into a DTensor between calls and needs a process group per shard group,
  created by every worker of the pool in the same order, while a pool's meshes change from call to call;
- a host's own model code (ComfyUI's casting layers, weight patches) would meet DTensors.
The next unit's gather is posted ahead only on CUDA (NCCL moves it beside the compute); on CPU workers gloo's
copies take the cores the compute needs, and posting ahead gained nothing (52.0 against 54.5 ms, 408.6 against
404.1 ms in the same measurement).
Pure but for the exchange, which the caller passes in (`group`: `degree`, `start(piece, name)` posts it,
`finish(started)` returns every rank's piece end to end in rank order; or, for pieces read in place, `keep(name,
piece)` as the model is cut and `pieces(piece, name)`: FileGroup), so one process can run a group's ranks in
threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..runtime.tensor_parts import PART, Span

SMALL = 1 << 16  # a module outside the blocks with fewer parameters stays whole (norms, small embedders)


@dataclass
class Gathers:
    """One rank's counts over the gathers of its model's forwards: read by the worker's reply and the tests."""

    units: int = 0
    bytes_received: int = 0
    mounted: set = field(default_factory=set)  # units holding whole weights now (at most two, between calls none)


class _Unit:
    """One module whose parameters gather together."""

    def __init__(self, name: str, module: nn.Module, degree: int, index: int, group, unit_number: int):
        self.name, self.module, self.number = name, module, unit_number
        self.entries = []  # (owner, attribute, shape, dtype, offset in its dtype's flat buffer)
        flats: dict[torch.dtype, list[torch.Tensor]] = {}  # dtype -> its parameters, in order
        seen: dict[int, tuple] = {}
        for owner, attribute, param in _group_params(module):
            if id(param) in seen:  # tied weights: one piece, mounted on each owner
                self.entries.append((owner, attribute, *seen[id(param)]))
                continue
            pieces = flats.setdefault(param.dtype, [])
            seen[id(param)] = (_whole_shape(param), param.dtype, sum(_whole_numel(p) for p in pieces))
            self.entries.append((owner, attribute, *seen[id(param)]))
            pieces.append(param)
        self.totals, self.dtypes = {}, list(flats)
        for number, (dtype, params) in enumerate(flats.items()):
            self.totals[dtype] = sum(_whole_numel(p) for p in params)
            spans = _spans([_whole_numel(p) for p in params], degree, index)
            piece = torch.cat([_elements(p, start, stop) for p, (start, stop) in zip(params, spans)])
            piece = nn.functional.pad(piece, (0, -(-self.totals[dtype] // degree) - piece.numel()))
            keep = getattr(group, "keep", None)  # a group whose pieces live elsewhere (FileGroup) moves it there
            module.register_buffer(f"_tandem_shard{number}", keep(f"{unit_number}-{number}", piece) if keep else piece,
                                   persistent=False)
        for owner, attribute, *_ in self.entries:
            owner._parameters[attribute] = None
        self.pending = None

    def shards(self) -> list[torch.Tensor]:
        return [getattr(self.module, f"_tandem_shard{number}") for number in range(len(self.dtypes))]

    def post(self, group) -> None:
        if self.pending is None and not hasattr(group, "pieces"):  # pieces read in place: nothing to post
            self.pending = [group.start(shard, f"{self.number}-{n}") for n, shard in enumerate(self.shards())]

    def mount(self, group, gathers: Gathers) -> None:
        pieces_of = getattr(group, "pieces", None)  # pieces readable in place (FileGroup): no whole to gather
        if pieces_of is not None:
            pieces = {dtype: pieces_of(shard, f"{self.number}-{n}")
                      for n, (dtype, shard) in enumerate(zip(self.dtypes, self.shards()))}
            value = lambda dtype, offset, size: _span(pieces[dtype], offset, size)  # noqa: E731
        else:
            self.post(group)
            started, self.pending = self.pending, None
            whole = {}
            for dtype, posted in zip(self.dtypes, started):
                whole[dtype] = group.finish(posted)[:self.totals[dtype]]
            value = lambda dtype, offset, size: whole[dtype][offset:offset + size]  # noqa: E731
        # every other rank's piece, each the size of this rank's own
        gathers.bytes_received += sum(s.numel() * s.element_size() for s in self.shards()) * (group.degree - 1)
        for owner, attribute, shape, dtype, offset in self.entries:
            size = int(torch.Size(shape).numel())
            owner._parameters[attribute] = nn.Parameter(value(dtype, offset, size).view(shape), requires_grad=False)
        gathers.units += 1
        gathers.mounted.add(self.name)

    def free(self, gathers: Gathers) -> None:
        for owner, attribute, *_ in self.entries:
            owner._parameters[attribute] = None
        gathers.mounted.discard(self.name)


def _span(pieces: list[torch.Tensor], offset: int, size: int) -> torch.Tensor:
    """Elements [offset, offset + size) of the pieces laid end to end (equal sizes): a view of the piece that
    holds them all (no copy), else the parts joined."""
    chunk = pieces[0].numel()
    if size == 0:
        return pieces[0][:0]
    first, last = offset // chunk, (offset + size - 1) // chunk
    if first == last:
        return pieces[first][offset - first * chunk:offset - first * chunk + size]
    parts = [pieces[first][offset - first * chunk:]]
    parts += [pieces[s] for s in range(first + 1, last)]
    parts.append(pieces[last][:offset + size - last * chunk])
    return torch.cat(parts)


def _group_params(module: nn.Module):
    """(owner, attribute, parameter) of every parameter of `module` the group shares, in module order (a rank's
    own share of a tensor cut is not the group's)."""
    for owner in module.modules():
        for attribute, param in list(owner._parameters.items()):
            if param is not None and not getattr(param, "_tandem_own", False):
                yield owner, attribute, param


def _spans(sizes: list[int], degree: int, index: int) -> list[tuple[int, int]]:
    """Of tensors of `sizes` elements laid end to end, padded to a multiple of `degree` and cut in `degree` equal
    pieces: the elements [start, stop) of each tensor that piece `index` holds."""
    chunk = -(-sum(sizes) // degree)
    low, high, offset, spans = chunk * index, chunk * (index + 1), 0, []
    for size in sizes:
        start, stop = max(offset, low), min(offset + size, high)
        spans.append((start - offset, max(start, stop) - offset))
        offset += size
    return spans


def _whole_shape(param) -> tuple[int, ...]:
    part = getattr(param, PART, None)
    return tuple(part.shape) if part is not None else tuple(param.shape)


def _whole_numel(param) -> int:
    return int(torch.Size(_whole_shape(param)).numel())


def _elements(param, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of `param` laid end to end; a weight read in part (runtime/tensor_parts.py) is
    that run already, checked against it."""
    part = getattr(param, PART, None)
    if part is None:
        return param.detach().reshape(-1)[start:stop]
    if not isinstance(part, Span) or (part.start, part.stop) != (start, stop):
        raise RuntimeError(f"a weight read as {part} is sharded as its elements [{start}, {stop}): the host's plan "
                           "of what each rank reads and the worker's cut disagree")
    return param.detach().reshape(-1)


def reads(module: nn.Module, degree: int, index: int, held: dict | None = None) -> dict:
    """What rank `index` of a group of `degree` keeps of each unit's parameters, without reading a weight:
    {parameter path: tensor_parts.Span}. held: what an earlier cut (tensor_splits.reads) keeps of the
    parameters it cuts ({path: Slices, or None for a weight it takes out of the module}): those are this rank's
    own, not sharded; the units are chosen by the sizes the parameters have after that cut."""
    held = held or {}
    names: dict[int, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)  # a tied weight: its first path, as the skeleton names it
    after = {name: (0 if part is None else part.numel()) for name, part in held.items()}
    kept = {}
    for _, unit in units_of(module, after):
        params = {}  # id -> (path, param), in the order the unit's pieces lay them
        for owner in unit.modules():
            for param in owner._parameters.values():
                if param is not None and names[id(param)] not in held:
                    params.setdefault(id(param), (names[id(param)], param))
        by_dtype: dict[torch.dtype, list] = {}
        for path, param in params.values():
            by_dtype.setdefault(param.dtype, []).append((path, param))
        for listed in by_dtype.values():
            spans = _spans([p.numel() for _, p in listed], degree, index)
            kept.update({path: Span(tuple(p.shape), *span) for (path, p), span in zip(listed, spans)})
    return kept


def units_of(module: nn.Module, sizes: dict | None = None) -> list[tuple[str, nn.Module]]:
    """(path, module) of each unit, in module order (see the module's docstring). sizes: {parameter path:
    elements} where a cut made before the shards changes them (tensor_splits.reads)."""
    found: list[tuple[str, nn.Module]] = []
    sizes = sizes or {}

    def count(path: str, child: nn.Module) -> int:  # a weight read in part counts whole, as on the host
        return sum(sizes.get(name, _whole_numel(p)) for name, p in child.named_parameters(prefix=path))

    def walk(prefix: str, parent: nn.Module) -> None:
        for name, child in parent.named_children():
            path = f"{prefix}{name}"
            if isinstance(parent, nn.ModuleList):
                if any(True for _ in child.parameters()):
                    found.append((path, child))
            elif isinstance(child, nn.ModuleDict) or any(isinstance(m, nn.ModuleList) for m in child.modules()):
                walk(f"{path}.", child)  # holds blocks: its blocks gather, not all of it at once
            elif count(path, child) >= SMALL:
                found.append((path, child))

    walk("", module)
    return found


class Sharded:
    """A module's units sharded over a group: the hooks that gather and free them, and `release()`, which frees
    whatever a failed call left gathered."""

    def __init__(self, module: nn.Module, degree: int, index: int, group, prefetch: bool):
        self.group, self.prefetch, self.gathers = group, prefetch, Gathers()
        self.units = [_Unit(name, unit, degree, index, group, number)
                      for number, (name, unit) in enumerate(units_of(module))]
        self.order: list[int] | None = []  # unit numbers in the order the first forward ran them (None: learnt)
        self.next: dict[int, int] = {}  # unit -> the unit that ran after it
        for number, unit in enumerate(self.units):
            unit.module.register_forward_pre_hook(self._before(number))
            unit.module.register_forward_hook(self._after(number))

    def _before(self, number: int):
        def hook(module, args):
            if self.order is not None:
                self._learn(number)
            self.units[number].mount(self.group, self.gathers)
            following = self.next.get(number)
            if self.prefetch and following is not None:
                self.units[following].post(self.group)
        return hook

    def _after(self, number: int):
        def hook(module, args, output):
            self.units[number].free(self.gathers)
        return hook

    def _learn(self, number: int) -> None:
        """The order the units ran in, up to the first that runs again (the next forward, or a layer called
        twice), so that the gather of the unit after each can be posted ahead. Every rank learns the same."""
        if number not in self.order:
            self.order.append(number)
            return
        self.next = dict(zip(self.order, self.order[1:]))
        self.order = None

    def close(self) -> None:
        """The model is dropped: files its pieces live in go (FileGroup)."""
        remove = getattr(self.group, "remove", None)
        if remove is not None:
            remove()

    def release(self) -> None:
        """Frees every gathered unit and drops gathers posted ahead (after a call that failed half-way)."""
        for unit in self.units:
            unit.pending = None
            unit.free(self.gathers)


def shard_in_place(module: nn.Module, degree: int, index: int, group, prefetch: bool = False) -> Sharded:
    """Shards `module` over a group of `degree` ranks; this rank is `index`. Returns the state its hooks use."""
    sharded = Sharded(module, degree, index, group, prefetch)
    module.__dict__["_tandem_sharded"] = sharded  # not a submodule
    return sharded


class PeerGroup:
    """A shard group over the pool's process group (runtime/primitives.py): every rank sends its piece to every
    other, received straight into the whole (point-to-point: on gloo, 1.4 to 1.6 GiB/s for 4 to 16 MiB pieces
    between two processes, against 0.4 to 0.8 GiB/s for `all_gather_into_tensor`; 2-core VM, torch 2.13)."""

    def __init__(self, peers: tuple[int, ...], index: int, device):
        self.peers, self.index, self.device = tuple(peers), index, device
        self.degree = len(self.peers)

    def start(self, piece: torch.Tensor, name: str = ""):
        from ..runtime import primitives

        return primitives.start_all_gather(piece, list(self.peers), self.index, self.device)

    def finish(self, started) -> torch.Tensor:
        from ..runtime import primitives

        return primitives.finish_all_gather(started)


class FileGroup:
    """A shard group of CPU workers on one machine: each rank moves its pieces into files of a shared-memory
    folder as it cuts the model (`keep`); a block's weights are then views of the peers' pieces in their files,
    mapped once (`pieces`), with no message, no wait on a peer and no copy but of a parameter that spans two
    pieces. What gloo's loopback TCP lacks: flux-small's 69 MiB of gathers per call
    took a call from 410 to 786 ms under ulysses on 2 CPU workers (`tandem bench --model flux-small --strategies
    ulysses --weights replicated,sharded --cfg 1`, 2-core VM), each process's copies into and out of the
    sockets taking the cores its compute needed. The files go with the pool's folder, or with the model
    (`remove`)."""

    def __init__(self, folder, peers: tuple[int, ...], index: int):
        from pathlib import Path

        self.folder, self.peers, self.index, self.degree = Path(folder), tuple(peers), index, len(peers)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._mapped: dict[tuple[int, str], torch.Tensor] = {}

    def keep(self, name: str, piece: torch.Tensor) -> torch.Tensor:
        shared = torch.from_file(str(self.folder / f"{self.index}-{name}"), shared=True, size=piece.numel(),
                                 dtype=piece.dtype)
        shared.copy_(piece)
        return shared

    def pieces(self, piece: torch.Tensor, name: str) -> list[torch.Tensor]:
        """Every rank's piece in rank order: this rank's own, the peers' mapped from their files (read in place:
        a block's weights are views of them, only a parameter that spans two pieces is copied)."""
        return [piece if s == self.index else self._peer(s, name, piece) for s in range(self.degree)]

    def _peer(self, s: int, name: str, like: torch.Tensor) -> torch.Tensor:
        if (s, name) not in self._mapped:  # every rank wrote its files before any call (all Loads answered)
            self._mapped[s, name] = torch.from_file(str(self.folder / f"{s}-{name}"), shared=True,
                                                    size=like.numel(), dtype=like.dtype)
        return self._mapped[s, name]

    def remove(self) -> None:
        """Unlinks this rank's files (peers keep what they mapped) once the model is dropped."""
        for path in self.folder.glob(f"{self.index}-*"):
            path.unlink(missing_ok=True)


def cut_on_load(worker, module: nn.Module, family: str, cut) -> nn.Module:
    """Worker side, as the model loads (on the CPU): this rank's shards of it (messages.Load.cut ("shard", peers,
    index, key)), gathering from `peers` (global ranks) on the worker's device: through files under the pool's
    folder where `key` names them (every peer a CPU worker of this machine: engine/weights.py), else over the
    process group."""
    _, peers, index, key = cut
    if key is not None and worker.pool_dir is not None and worker.device.type == "cpu":
        group = FileGroup(worker.pool_dir / "shards" / key, tuple(peers), index)
    else:
        group = PeerGroup(tuple(peers), index, worker.device)
    shard_in_place(module, len(peers), index, group, prefetch=worker.device.type == "cuda")
    return module
