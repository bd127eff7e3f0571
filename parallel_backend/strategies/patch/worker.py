"""The worker side of patch: the stale store that outlives a call, the context each call is run with, and the
handler that runs a DiT (group.py) or a UNet (models/unet_patch.py) on it.

Exchanges stay in flight between calls: an attention posts its fresh keys and values and the same attention of
the next call takes them. Every rank of a group runs the same calls in the same order and issues one exchange per
attention per call, so what is in flight pairs up on every rank whatever each decides (synchronous or stale).
The store keeps, per model (the worker's slot: dropped with the model), the current job's stale values per
(peers, stream); a new job first finishes what the last job left in flight (each in-flight exchange's `finish`: its peers posted
the other half, so the wait returns at once), then starts empty. A failed call tears the pool down (the request
is collective), and the store with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..sequence.traffic import Traffic
from .group import PatchGroup


@dataclass
class PatchContext:
    """One call of one rank of a patch group: what a runner (group.PatchGroup for DiTs, models/unet_patch.py's
    `run_unet_patch` for UNets) needs.

    peers: the group's global ranks in band order; index: this rank's position in them; degree: len(peers);
    device; step: the call's sampler step (None: unknown); synchronous: warm-up, where every exchange is waited
    for in the call and the result is exact; stale: what this rank's runner wrote at the group's previous call
    of this job and stream, which it reads and overwrites (an exchange in flight in it is finished before the
    dict is dropped); traffic: what this rank sent and how long it waited; stale_reads: the layers that used stale values
    in this call (the runner counts them; 0: the call was exact)."""

    peers: tuple[int, ...]
    index: int
    device: torch.device
    step: int | None
    synchronous: bool
    stale: dict
    traffic: Traffic = field(default_factory=Traffic)
    stale_reads: int = 0

    @property
    def degree(self) -> int:
        return len(self.peers)


class PatchStore:
    """One worker's stale values for one model: {(peers, stream): dict} of the current job, and its calls."""

    def __init__(self):
        self.job = None
        self.stale: dict = {}
        self.calls: dict = {}

    def context(self, message, device: torch.device) -> PatchContext:
        call = message.call
        if call.job != self.job:
            self.drop()
            self.job = call.job
        key = (tuple(message.peers), call.stream)
        earlier = self.calls.get(key, 0)
        self.calls[key] = earlier + 1
        warming = call.step < message.warmup if call.step is not None else earlier == 0
        return PatchContext(tuple(message.peers), message.index, device, call.step, warming,
                            self.stale.setdefault(key, {}))

    def drop(self) -> None:
        """Finishes what is in flight (every peer posted its half) and forgets every stale value."""
        for values in self.stale.values():
            for posted in _in_flight(values):
                posted.finish()
        self.stale, self.calls = {}, {}


def _in_flight(value):
    """The exchanges in flight anywhere in a runner's stale values: a DiT's (group.Posted, beside its shapes) and
    a UNet's (models/unet_patch.Posted, listed under its own key): whatever has a `finish`."""
    if hasattr(value, "finish"):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _in_flight(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _in_flight(item)


def run_patch_forward(worker, message):
    """Worker side of `PatchForward`: the family's sequence runner over a PatchGroup (a DiT), or
    `run_unet_patch` (a UNet); every rank ends with the whole output and only the group's first sends it back."""
    from ...models import adapter_name, sequence_runner
    from ...models.stages import synchronize
    from ...runtime.messages import Computed

    module, family = worker.whole_model(message.fingerprint)
    store = worker.slot(message.fingerprint, "patch", PatchStore)
    context = store.context(message, worker.device)
    call = message.call.to(worker.device)
    started = time.perf_counter()
    with torch.inference_mode():
        if adapter_name(family).endswith("_unet"):
            from ...models.unet_patch import run_unet_patch

            out = run_unet_patch(module, call, context)
        else:
            out = sequence_runner(family)(module, call, PatchGroup(context))
    synchronize(worker.device)
    traffic = context.traffic
    return Computed(out if message.index == 0 else None, time.perf_counter() - started - traffic.waited_s,
                    traffic.waited_s, traffic.bytes_sent,
                    extra={"passes": traffic.passes, "messages": traffic.messages, "bytes": traffic.bytes_sent,
                           "synchronous": context.stale_reads == 0})
