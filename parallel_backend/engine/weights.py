"""Where a model's weights live on the pool: whole on every device ("replicated") or each block's parameters
divided over the devices that run every call together ("sharded", models/weight_shards.py), and "auto": whole
where the weights fit the memory per device, sharded where they do not.

Sharded weights compose with the strategies' own cuts (`Strategy.weights_layout`): a strategy's cut is (name,
peers, index, ...), `peers` the ranks that run every call of the cut model together (a tensor group); they
shard the model further among themselves. Without a strategy's cut, every device of the pool holds a share.
CPU workers of one machine keep their shares in files of the pool's folder and read each other's
(weight_shards.FileGroup); other devices gather by messages, so a device a call leaves without rows runs one row
of it (`fillers`), and every block's gather finds its group.
"""

from __future__ import annotations

import weakref

from ..runtime import validation
from ..runtime.messages import Forward, TimedForward

REPLICATED, SHARDED, AUTO = "replicated", "sharded", "auto"
CHOICES = (REPLICATED, SHARDED, AUTO)
HEADROOM = 0.8  # "fits": the weights take at most this share of a device's memory (activations take the rest)


def layout(weights: str, strategy_layout: dict | None, devices: int, local_key: str | None = None) -> dict | None:
    """{rank: cut} for the workers' Loads (messages.Load.cut): the strategy's, sharded where `weights` (already
    resolved: replicated or sharded) says so. local_key: where every device is a CPU worker of this machine, a
    name for the model, under which their shards live in files of the pool's folder (weight_shards.FileGroup)."""
    if weights != SHARDED or devices < 2:
        return strategy_layout
    import hashlib

    # files of one model and cut: two cuts of a model held at once (ulysses' whole blocks, tensor's) must not
    # share a name
    cut_name = "whole" if strategy_layout is None else hashlib.sha256(
        repr(sorted(strategy_layout.items())).encode()).hexdigest()[:12]

    def shard(peers: tuple[int, ...], index: int) -> tuple:
        key = None if local_key is None else f"{local_key}-{cut_name}-{'_'.join(map(str, peers))}"
        return ("shard", peers, index, key)

    if strategy_layout is None:
        peers = tuple(range(devices))
        return {rank: shard(peers, rank) for rank in peers}
    sharded = {}
    for rank, cut in strategy_layout.items():
        peers, index = tuple(cut[1]), cut[2]
        sharded[rank] = (cut, shard(peers, index)) if len(peers) > 1 else cut
    return sharded


def reads(module, family: str, cut) -> dict | None:
    """What a worker keeps of each weight of `module` (the host's, a module, not a recipe) under its Load's `cut`
    (one cut or several in order: a tensor cut, then its shards), read off the module's names and shapes without
    touching a weight: {tensor name as the shipped file names it: tensor_parts Slices or Span}; weights not named
    are read whole. None where a cut has no such plan (the worker then reads the whole model)."""
    from .. import strategies
    from ..models import weight_shards
    from ..runtime.cache_format import plain

    held: dict = {}
    for part in ((cut,) if isinstance(cut[0], str) else cut):
        if part[0] == "shard":
            held.update(weight_shards.reads(module, len(part[1]), part[2], held))
            continue
        planned = strategies.get(part[0]).reads_on_load if part[0] in strategies.names() else None
        if planned is None:
            return None
        held.update(planned(module, family, part, held))
    first: dict[int, str] = {}  # a tied weight travels once, under its first name (cache_format.split)
    for name, tensor in (*module.named_parameters(remove_duplicate=False), *module.named_buffers()):
        first.setdefault(id(tensor), name)
    paths = dict(module.named_parameters(remove_duplicate=False))
    named = {}
    for path, part in held.items():
        if part is None:
            continue
        if not plain(paths[path]):  # travels as a storage (a quantized subclass): read whole, cut on the worker
            return None
        name = first[id(paths[path])]
        if named.get(name, part) != part:
            raise RuntimeError(f"{path} is a tied weight that two cuts keep differently ({named[name]}, {part})")
        named[name] = part
    return named


def local_cpus(devices) -> bool:
    """Every device a CPU worker of this machine (its shards can live in shared files)."""
    return all(d.split(":")[0] == "cpu" for d in devices)


def shard_groups(layout_: dict | None) -> dict[int, tuple[int, ...]]:
    """rank -> the ranks it gathers with by messages, for the ranks of `layout_` that hold shards so (shards in
    files need no peer to run: not listed)."""
    groups = {}
    for rank, cut in (layout_ or {}).items():
        for part in ((cut,) if isinstance(cut[0], str) else cut):
            if part[0] == "shard" and part[3] is None:
                groups[rank] = tuple(part[1])
    return groups


def fillers(work: dict, groups: dict[int, tuple[int, ...]]) -> dict:
    """{rank: message} for the ranks of a shard group that `work` leaves without a message, to run and throw
    away so that their shards reach the ranks that compute: one row of a call of the group's, or auto's timed
    call itself (it runs the model more than once: every rank must run as many forwards)."""
    sample = next((m for r, m in work.items() if r in groups and getattr(m, "call", None) is not None), None)
    if sample is None:
        return {}
    wanted = {peer for rank in work if rank in groups for peer in groups[rank]}
    one = sample if isinstance(sample, TimedForward) else Forward(sample.fingerprint, sample.call.select(range(1)))
    return {rank: one for rank in sorted(wanted - set(work))}


def resolve(weights: str, model_bytes: int, budget_bytes: int | None) -> str:
    """replicated or sharded: `auto` shards where the whole weights do not fit the budget per device."""
    if weights != AUTO:
        return weights
    if budget_bytes is None:
        return REPLICATED
    return REPLICATED if model_bytes <= HEADROOM * budget_bytes else SHARDED


_SIZES = weakref.WeakKeyDictionary()  # host module -> (its weights' bytes, each unit's bytes)


def sizes(module) -> tuple[int, tuple[int, ...]]:
    """(the bytes of a module's weights, the bytes of each unit sharded weights gather), measured once per
    module."""
    if module not in _SIZES:
        from ..models.weight_shards import units_of
        from ..runtime.recipe import weights_bytes

        _SIZES[module] = (weights_bytes(module), tuple(weights_bytes(unit) for _, unit in units_of(module)))
    return _SIZES[module]


def sharded_bytes(module, group: int) -> int:
    """What a device holds of `module` sharded over `group` devices while a unit runs: the weights outside the
    units, 1/group of the units, and the largest unit gathered."""
    whole, units = sizes(module)
    if not units:
        return whole
    return whole - sum(units) + sum(units) // group + max(units)


def default_budget_bytes(devices: list[str]) -> int | None:
    """The memory per device where none is given: the least free memory of this machine's CUDA devices; for CPU
    workers, the machine's available memory shared among them (runtime/validation.py `available_bytes`). None
    where it cannot be told (another machine's devices only)."""
    local = [d for d in devices if "/" not in d]
    cpus = [d for d in local if d.startswith("cpu")]
    budgets = [validation.available_bytes("cpu") // len(cpus)] if cpus else []
    budgets += [validation.available_bytes(d) for d in local if d.startswith("cuda")]
    return min(budgets) if budgets else None
