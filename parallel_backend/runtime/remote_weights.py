"""The host's side of the weights caches of other machines (weights_cache.py): a model crosses the network to
a machine at most once, however many of its workers the pool has, and not at all when that machine already
holds it, also after this host process restarts (the cache is named by the weights' content hash). A machine
whose cached file failed its check (weights_cache.WeightsCache.check) answers that it does not hold the model,
and is sent it again."""

from __future__ import annotations

import logging
from collections import OrderedDict

from .carry import CannotCarry
from .deadlines import load_bound
from .messages import HoldsWeights, StoreWeights
from .devices import split_device
from .shipping import cached_weights_hash

log = logging.getLogger("tandem")


def send_to_machines(request, workers, payload, family: str, fingerprint: str,
                     first_s: float = 0.0, modules: dict | None = None, parts: dict | None = None
                     ) -> tuple[dict[int, str], dict[str, int]]:
    """Makes every machine of `workers` (another machine's workers: objects with .rank and .device
    "HOST:PORT/DEVICE") hold what its workers load of `payload` (a module or its recipe; `modules`: the host
    modules it names, host_modules.py) in its weights cache: the whole model, or for a rank with `parts`
    ({rank: {name: tensor_parts part}}, what its cut keeps) only that cut (`cut_image`), named by
    tensor_parts.cut_hash. Asks one worker per machine and entry whether it holds it; sends its skeleton and its
    tensors' safetensors file (cache_format.py) to that worker where not. request: the pool's request(requests,
    what, deadline=...). Returns each rank's entry (the cached name it loads) and the bytes sent to each machine
    (0 where it held everything). Raises RuntimeError, before sending anything, when an entry is larger than
    its machine's cache bound."""
    parts = parts or {}
    weights_hash = cached_weights_hash(payload, family, fingerprint)
    images: dict = {}  # entry -> (skeleton, tensors blob) once made

    def image(entry: str, cut: dict | None):
        if entry not in images:
            images[entry] = cache_image(payload) if cut is None else cut_image(payload, cut)[1:]
        return images[entry]

    entries: dict[int, str] = {}
    cuts: dict[str, dict | None] = {}  # entry -> its parts (None: the whole model)
    for worker in workers:
        cut = parts.get(worker.rank)
        entry = weights_hash if not cut else _cut_name(payload, family, fingerprint, weights_hash, cut, images)
        entries[worker.rank], cuts[entry] = entry, cut or None
    speakers: dict[tuple[str, str], int] = {}  # (machine, entry) -> the rank that asks and stores for it
    for worker in sorted(workers, key=lambda w: w.rank):
        speakers.setdefault((split_device(worker.device)[0], entries[worker.rank]), worker.rank)
    replies = request({rank: HoldsWeights(entry) for (_, entry), rank in speakers.items()},
                      "asking for the model in its machine's weights cache")
    lacking = {key: rank for key, rank in speakers.items() if not replies[rank].value["held"]}
    for (name, _), rank in lacking.items():
        if replies[rank].value.get("removed"):
            log.warning("Tandem: %s: its weights cache removed the model's file (%s); sending it again", name,
                        replies[rank].value["removed"])
    sent = dict.fromkeys((machine for machine, _ in speakers), 0)
    if not lacking:
        return entries, sent
    sizes = {}
    for (name, entry), rank in lacking.items():
        skeleton, blob = image(entry, cuts[entry])
        sizes[entry] = len(skeleton) + blob.numel()
        limit = replies[rank].value["limit"]
        if sizes[entry] > limit:
            what = "the model" if cuts[entry] is None else "the model's share its workers keep"
            raise RuntimeError(f"{name}: {what} ({sizes[entry] / 2**30:.2f} GiB) is larger than that machine's "
                               f"weights cache ({limit / 2**30:.2f} GiB): restart its `tandem worker serve` with a "
                               "larger --cache-size")
    stores = {}
    for (name, entry), rank in lacking.items():
        skeleton, blob = image(entry, cuts[entry])
        whole = None if cuts[entry] is None else weights_hash
        stores[rank] = StoreWeights(entry, family, skeleton, blob, modules or {}, cuts[entry], whole)
        sent[name] += sizes[entry]
    request(stores, "keeping the model in its machine's weights cache",
            deadline=load_bound(max(sizes.values()), first_s))
    return entries, sent


_CUT_NAMES: OrderedDict = OrderedDict()  # (fingerprint, parts) -> the cut's entry name, the most recently used last


def _cut_name(payload, family: str, fingerprint: str, weights_hash: str, cut: dict, images: dict) -> str:
    """The entry name of a cut of the payload (tensor_parts.cut_hash), computed once per fingerprint and cut in
    this process; the image it was computed from is kept in `images` for the send."""
    key = (fingerprint, repr(sorted(cut.items(), key=lambda item: item[0])))
    if key not in _CUT_NAMES:
        name, skeleton, blob = cut_image(payload, cut, weights_hash, family)
        images[name] = (skeleton, blob)
        _CUT_NAMES[key] = name
        while len(_CUT_NAMES) > 64:
            _CUT_NAMES.popitem(last=False)
    _CUT_NAMES.move_to_end(key)
    return _CUT_NAMES[key]


def cut_image(payload, cut: dict, weights_hash: str = "", family: str = "") -> tuple[str, bytes, object]:
    """(its entry name, skeleton, tensors) of a cut of a payload: the skeleton whole, each tensor `cut` names
    ({name: tensor_parts part}) as its part alone (tensor_parts.take), the others whole. The name is
    tensor_parts.cut_hash of exactly these tensors (empty where weights_hash is not given)."""
    import warnings

    import torch

    from .cache_format import split, tensors_image
    from .tensor_parts import cut_hash, take

    skeleton, tensors = _split_or_refuse(split, payload)
    tensors = {name: (take(t, cut[name]) if name in cut else t) for name, t in tensors.items()}
    name = cut_hash(weights_hash, family, tensors, cut) if weights_hash else ""
    image = tensors_image(tensors)
    with warnings.catch_warnings():  # a read-only buffer: the tensor is only read (sent), never written
        warnings.simplefilter("ignore", UserWarning)
        return name, skeleton, torch.frombuffer(image, dtype=torch.uint8)


def _split_or_refuse(split, payload):
    """cache_format.split(payload), a payload that does not pickle refused with CannotCarry (the host's cue for
    its stock path)."""
    try:
        return split(payload)
    except Exception as exc:  # e.g. a lock or an open file kept on the model
        raise CannotCarry(f"the model cannot be written for the workers of other machines ({type(exc).__name__}: "
                          f"{exc})") from exc


def cache_image(payload) -> tuple[bytes, object]:
    """(skeleton, tensors): what a machine's cache is sent of a payload (cache_format.py), the tensors' safetensors
    file as a uint8 tensor (raw bytes on the channel, not copied again). Their sizes add up to the bytes sent.
    Raises CannotCarry (the host's cue for its stock path) for a payload that does not pickle."""
    return cut_image(payload, {})[1:]
