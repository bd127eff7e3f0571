"""The host's side of the weights caches of other machines (weights_cache.py): a model crosses the network to
a machine at most once, however many of its workers the pool has, and not at all when that machine already
holds it, also after this host process restarts (the cache is named by the weights' content hash). A machine
whose cached file failed its check (weights_cache.WeightsCache.check) answers that it does not hold the model,
and is sent it again."""

from __future__ import annotations

import logging

from .carry import CannotCarry
from .deadlines import load_bound
from .messages import HoldsWeights, StoreWeights
from .devices import split_device
from .shipping import cached_weights_hash

log = logging.getLogger("tandem")


def send_to_machines(request, workers, payload, family: str, fingerprint: str,
                     first_s: float = 0.0, modules: dict | None = None) -> tuple[str, dict[str, int]]:
    """Makes every machine of `workers` (another machine's workers: objects with .rank and .device
    "HOST:PORT/DEVICE") hold `payload` (a module or its recipe; `modules`: the host modules it names,
    host_modules.py) in its weights cache. Asks one worker per machine whether it does; sends
    its skeleton and its tensors' safetensors file (cache_format.py) to one worker of each machine that does not. request: the pool's request(requests,
    what, deadline=...). Returns the weights' hash (the cached name the workers load) and the bytes sent to each
    machine (0 where it already held the model). Raises RuntimeError, before sending anything, when the model
    is larger than a machine's cache bound."""
    machines: dict[str, int] = {}  # machine -> the rank that speaks for it
    for worker in sorted(workers, key=lambda w: w.rank):
        machines.setdefault(split_device(worker.device)[0], worker.rank)
    weights_hash = cached_weights_hash(payload, family, fingerprint)
    replies = request({rank: HoldsWeights(weights_hash) for rank in machines.values()},
                      "asking for the model in its machine's weights cache")
    lacking = {name: rank for name, rank in machines.items() if not replies[rank].value["held"]}
    for name, rank in lacking.items():
        if replies[rank].value.get("removed"):
            log.warning("Tandem: %s: its weights cache removed the model's file (%s); sending it again", name,
                        replies[rank].value["removed"])
    sent = dict.fromkeys(machines, 0)
    if not lacking:
        return weights_hash, sent
    skeleton, blob = cache_image(payload)
    nbytes = len(skeleton) + blob.numel()
    for name, rank in lacking.items():
        limit = replies[rank].value["limit"]
        if nbytes > limit:
            raise RuntimeError(f"{name}: the model ({nbytes / 2**30:.2f} GiB) is larger than that machine's weights "
                               f"cache ({limit / 2**30:.2f} GiB): restart its `tandem worker serve` with a larger "
                               "--cache-size")
    request({rank: StoreWeights(weights_hash, family, skeleton, blob, modules or {}) for rank in lacking.values()},
            "keeping the model in its machine's weights cache", deadline=load_bound(nbytes, first_s))
    sent.update(dict.fromkeys(lacking, nbytes))
    return weights_hash, sent


def cache_image(payload) -> tuple[bytes, object]:
    """(skeleton, tensors): what a machine's cache is sent of a payload (cache_format.py), the tensors' safetensors
    file as a uint8 tensor (raw bytes on the channel, not copied again). Their sizes add up to the bytes sent.
    Raises CannotCarry (the host's cue for its stock path) for a payload that does not pickle."""
    import warnings

    import torch

    from .cache_format import split, tensors_image

    try:
        skeleton, tensors = split(payload)
    except Exception as exc:  # e.g. a lock or an open file kept on the model
        raise CannotCarry(f"the model cannot be written for the workers of other machines ({type(exc).__name__}: "
                          f"{exc})") from exc
    image = tensors_image(tensors)
    with warnings.catch_warnings():  # a read-only buffer: the tensor is only read (sent), never written
        warnings.simplefilter("ignore", UserWarning)
        return skeleton, torch.frombuffer(image, dtype=torch.uint8)
