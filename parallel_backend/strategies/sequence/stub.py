"""One rank of a sequence group with the communication stubbed out, for `tandem bench`'s ideal: the compute a
rank does for its shard (its tokens through every per-token layer, and its share of every attention), with
nothing sent or received. Its outputs have the right shapes and meaningless values; only its time counts.

Per attention, a rank attends, with its share of the heads (H / ulysses), the queries of its ulysses
subgroup's tokens (all tokens for Ulysses, its own for ring) to the key/value blocks of the ring (one block for
Ulysses: `sdpa` on (B, H/N, L, D), its own path; r blocks otherwise, through the online-softmax merge, as ring
and USP do). The gather returns a tensor of the whole length without an exchange.
"""

from __future__ import annotations

import torch

from .group import SequenceGroup
from .ring import RingAccumulator
from .shards import Shards
from .ulysses import heads_per_rank, sdpa
from .usp import UspLayout


def _stretch(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`x` repeated along `dim` to `length` (a stand-in for the tokens other ranks hold)."""
    if x.shape[dim] == length:
        return x
    if x.shape[dim] == 0:
        return x.new_zeros((*x.shape[:dim], length, *x.shape[dim + 1:]))
    copies = -(-length // x.shape[dim])
    return torch.cat([x] * copies, dim).narrow(dim, 0, length)


class StubGroup(SequenceGroup):
    """Rank 0 of a group of `degree` ranks of `kind` ("ulysses", "ring" or "usp" with `ulysses` ranks per
    subgroup): the group's own cut and head check, its attention and gather computed without any exchange."""

    def __init__(self, kind: str, degree: int, ulysses: int | None = None):
        super().__init__(kind, tuple(range(degree)), 0, torch.device("cpu"), ulysses=ulysses)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shards: Shards,
                  key_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
        heads = heads_per_rank(q.shape[1], self.ulysses)
        blocks = UspLayout.of(self.degree, self.ulysses).blocks(shards)
        mine = [_stretch(t[:, :heads], blocks.sizes[0], 2) for t in (q, k, v)]  # rank 0's subgroup is block 0
        if blocks.degree == 1:
            out = sdpa(*mine, key_mask, scale)
        else:
            merged = RingAccumulator(mine[0], scale)
            for size in blocks.sizes:
                merged.add(_stretch(mine[1], size, 2), _stretch(mine[2], size, 2))
            out = merged.result()[0]
        return _stretch(out.narrow(2, 0, q.shape[2]), q.shape[1], 1).to(q.dtype)

    def all_gather(self, piece: torch.Tensor, shards: Shards, dim: int) -> torch.Tensor:
        return _stretch(piece, shards.length, dim % piece.dim())
