"""One rank of a sequence group with the communication stubbed out, for `tandem bench`'s ideal: the compute a
rank does for its shard (its tokens through every per-token layer, and its share of every attention), with
nothing sent or received. Its outputs have the right shapes and meaningless values; only its time counts.

Per attention, a Ulysses rank attends every token with its share of the heads (the same path: `sdpa` on
(B, H/N, L, D)); a ring rank attends its queries to N key/value blocks through the same online-softmax merge.
The gather returns a tensor of the whole length without an exchange.
"""

from __future__ import annotations

import torch

from .group import SequenceGroup
from .ring import RingAccumulator
from .shards import Shards
from .ulysses import heads_per_rank, sdpa


def _stretch(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`x` repeated along `dim` to `length` (a stand-in for the tokens other ranks hold)."""
    if x.shape[dim] == 0:
        return x.new_zeros((*x.shape[:dim], length, *x.shape[dim + 1:]))
    copies = -(-length // x.shape[dim])
    return torch.cat([x] * copies, dim).narrow(dim, 0, length)


class StubGroup(SequenceGroup):
    """Rank 0 of a group of `degree` ranks of `kind` ("ulysses" or "ring"): the group's own cut and head check,
    its attention and gather computed without any exchange."""

    def __init__(self, kind: str, degree: int):
        super().__init__(kind, tuple(range(degree)), 0, torch.device("cpu"))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shards: Shards,
                  key_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
        if self.kind == "ulysses":
            heads = heads_per_rank(q.shape[1], self.degree)
            whole = [_stretch(t[:, :heads], shards.length, 2) for t in (q, k, v)]
            out = sdpa(*whole, key_mask, scale)
            return _stretch(out.narrow(2, 0, q.shape[2]), q.shape[1], 1).to(q.dtype)
        merged = RingAccumulator(q, scale)
        for size in shards.sizes:
            merged.add(_stretch(k, size, 2), _stretch(v, size, 2))
        return merged.result()[0].to(q.dtype)

    def all_gather(self, piece: torch.Tensor, shards: Shards, dim: int) -> torch.Tensor:
        return _stretch(piece, shards.length, dim % piece.dim())
