"""A DiT's attention under patch (DistriFusion): this rank's queries attend to its own band's fresh keys and values
and to the other bands' from the previous call of the same job, merged exactly (sequence/attention.py).

Per attention, in the order the model issues them (the n-th attention of a call meets the n-th of the next):
1. the exchange the same attention posted at the previous call is finished (it travelled meanwhile);
2. this call's fresh keys and values (one tensor, k and v side by side) are posted to every other rank;
3. synchronous (warm-up, or nothing stale of this call's shapes): the exchange just posted is waited for and
   every band is fresh (exact, equal to ring or one device); else the stale bands from step 1 are used and the
   exchange stays in flight until the next call.
Every rank posts exactly one exchange per attention per call, so the messages pair up in issue order (NCCL)
whatever is decided. The shapes that make stale values usable (every band's tokens, rows, heads, widths and
dtype) are the same on every rank, so all ranks decide alike.
Traffic per attention per rank: its k and v to each of the N-1 others.
"""

from __future__ import annotations

import torch

from ...runtime import primitives
from ..sequence.attention import block_attention, merge
from ..sequence.group import SequenceGroup
from ..sequence.shards import Shards
from ..sequence.traffic import Traffic, timed_wait

TOKENS = -2


class Posted:
    """An all-to-all posted by `primitives.start_all_to_all`, finished once (`finish` returns what arrived)."""

    def __init__(self, started: tuple):
        self.started, self.received = started, None

    def finish(self, traffic: Traffic | None = None) -> list[torch.Tensor]:
        if self.received is None:
            self.received = timed_wait(traffic, primitives.finish_all_to_all, self.started)
            self.started = None
        return self.received


class PatchGroup(SequenceGroup):
    """A sequence group (cut and gather as ring's) whose attention uses the other bands' stale keys and values."""

    def __init__(self, context):
        """context: this rank's worker.PatchContext for the call."""
        super().__init__("ring", context.peers, context.index, context.device, context.traffic)
        self.context, self.attentions = context, 0

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shards: Shards,
                  key_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
        """q, k (B, H, L_r, D), v (B, H, L_r, Dv) for this rank's band -> (B, H, L_r, Dv) in q's dtype. key_mask:
        (B, L) bool over the whole joint sequence (True: the key takes part), the same on every rank."""
        key = ("attention", self.attentions)
        self.attentions += 1
        shapes = [(*k.shape[:2], size, k.shape[-1] + v.shape[-1]) for size in shards.sizes]
        shape_key = (tuple(shards.lengths), shards.weights, tuple(shapes), k.dtype)
        held = self.context.stale.get(key)
        stale = None
        if held is not None:
            received = held[1].finish(self.traffic)
            if held[0] == shape_key and not self.context.synchronous:
                stale = received
                self.context.stale_reads += 1
        fresh = torch.cat([k, v], -1)
        n = self.degree
        posted = Posted(primitives.start_all_to_all([fresh] * n, shapes, list(self.peers), self.index, self.device))
        self.traffic.record([fresh] * (n - 1))
        self.context.stale[key] = (shape_key, posted)
        bands = stale if stale is not None else posted.finish(self.traffic)
        return attend_bands(q, k, v, bands, shards, self.index, key_mask, scale).to(q.dtype)


def attend_bands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bands: list[torch.Tensor], shards: Shards,
                 index: int, key_mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """Attention of this rank's queries to its own fresh k, v and every other rank's k and v side by side in
    `bands` (bands[s]: rank s's, (B, H, L_s, D + Dv); its own entry is not read), merged exactly."""
    others = [s for s in range(shards.degree) if s != index]

    def mask(ranks: list[int]):
        return None if key_mask is None else key_mask[:, [p for s in ranks for p in shards.positions(s)]]

    out = block_attention(q, k, v, scale, mask([index]))
    if others:
        rest = torch.cat([bands[s] for s in others], TOKENS)
        out = merge(out, block_attention(q, *rest.split([k.shape[-1], v.shape[-1]], -1), scale, mask(others)))
    return out[0]
