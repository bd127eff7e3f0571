"""Ring attention: each rank keeps its queries; the key/value blocks travel around the ring.

Rank r of N holds q, k, v for its shard of the tokens (`Shards`). In pass p = 0..N-1 it attends its queries to
the block of rank (r - p) mod N, which it then forwards to rank r+1 while it receives the block of rank
(r - p - 1) mod N from rank r-1: N-1 transfers in all, each posted before the compute on the block it holds,
so the transfer of the next block overlaps the current attention. Each pass gives (out, lse) and the passes
merge with the online-softmax rule (attention.py): exact up to float rounding, in any order of the blocks.
Uneven shards: the size of every arriving block is known from the plan (the shard of its origin rank).
A ring over `Blocks` passes blocks of several ranks' tokens (USP: a ulysses subgroup's, usp.py).

`ring_schedule` is the pure plan; `RingAccumulator` the merge; `ring_attention` runs them with
`primitives.exchange`. Traffic per attention per rank: (N-1) blocks of k and v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...runtime import primitives
from .attention import block_attention, merge
from .shards import Blocks, Shards
from .traffic import Traffic, timed_wait


@dataclass(frozen=True)
class RingPass:
    """What one rank does in one pass of a ring attention."""

    step: int
    holds: int  # the rank whose key/value block it attends to in this pass
    receives: int | None  # the rank whose block arrives from the previous rank during this pass (None: last pass)

    @property
    def forwards(self) -> bool:
        """Sends the block it holds to the next rank, posted before the attention on it."""
        return self.receives is not None


def ring_schedule(degree: int, index: int) -> list[RingPass]:
    """Rank `index`'s passes in a ring of `degree` ranks."""
    return [RingPass(p, (index - p) % degree, (index - p - 1) % degree if p < degree - 1 else None)
            for p in range(degree)]


class RingAccumulator:
    """Attention of fixed queries to the blocks added so far; `result()` is attention to all of them."""

    def __init__(self, q: torch.Tensor, scale: float | None = None):
        self.q, self.scale, self.acc = q, scale, None

    def add(self, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> None:
        self.acc = merge(self.acc, block_attention(self.q, k, v, self.scale, key_mask))

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) in float32: out (B, H, Lq, Dv), lse (B, H, Lq)."""
        if self.acc is None:
            raise RuntimeError("ring attention merged no block")
        return self.acc


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shards: Shards | Blocks, index: int,
                   peers: list[int] | None = None, key_mask: torch.Tensor | None = None,
                   scale: float | None = None, traffic: Traffic | None = None) -> torch.Tensor:
    """Attention of this rank's queries to the whole sequence, the group passing k/v around; returns its rows.

    q: (B, H, L_r, D), k: (B, H, L_r, D), v: (B, H, L_r, Dv), L_r = shards.sizes[index]. `peers`: the ring's
    global ranks in shard order (default 0..N-1); this rank is peers[index]. key_mask: (B, L) bool over the
    whole joint sequence in joint order (True: the key takes part), the same on every rank; every query must
    see at least one key in all (a query that sees none gets 0). Returns (B, H, L_r, Dv) in q's dtype.
    """
    n = shards.degree
    peers = list(range(n)) if peers is None else list(peers)
    following, preceding = peers[(index + 1) % n], peers[(index - 1) % n]
    accumulator = RingAccumulator(q, scale)
    block = (k, v)
    for step in ring_schedule(n, index):
        arriving, handles = None, []
        if step.forwards:  # k then v, received in that order
            size = shards.sizes[step.receives]
            specs = [(preceding, (*t.shape[:-2], size, t.shape[-1]), t.dtype) for t in block]
            arriving, handles = primitives.exchange([(following, t) for t in block], specs, q.device)
            if traffic is not None:
                traffic.record(list(block))
        mask = None if key_mask is None else key_mask[:, shards.positions(step.holds)]
        accumulator.add(*block, mask)
        timed_wait(traffic, primitives.wait_all, handles)
        block = arriving
    return accumulator.result()[0].to(q.dtype)
