"""USP (Unified Sequence Parallelism): Ulysses and ring in one group of ulysses x ring ranks.

The group's N = u x r ranks each hold a shard of the tokens (`Shards` of degree N). The ranks of one ulysses
subgroup are adjacent (rank i is ulysses index i % u of subgroup i // u), so on GPUs the all-to-all, the heavier
exchange, stays among neighbours. For each attention:
1. an all-to-all inside the subgroup trades token shards for head shards (ulysses.py): each rank then holds
   H/u heads of every token of its subgroup;
2. the r ranks that hold the same heads (one per subgroup) run a ring (ring.py): the key/value blocks are the
   subgroups' token sets, merged with the online softmax, the next transfer posted before the current block;
3. the all-to-all back returns each rank its own tokens with every head.
Exact (the merge is exact and attention does not depend on the order of the keys, see shards.py). u = N is
Ulysses, u = 1 is ring. The heads must divide by u. A key mask (B, L) over the whole joint sequence is cut per
ring block (`Blocks`), in the order the all-to-all gathered the subgroup's tokens.

Traffic per attention per rank: Ulysses' two all-to-alls among u ranks, and r-1 ring passes for each chunk of
heads Ulysses attends at a time (`ulysses.pipeline_chunks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ring import ring_attention
from .shards import Blocks, Shards
from .traffic import Traffic
from .ulysses import ulysses_attention


@dataclass(frozen=True)
class UspLayout:
    """Which ranks of a USP group of `ulysses` x `ring` ranks exchange with which; ranks are group indices."""

    ulysses: int
    ring: int

    def __post_init__(self):
        if self.ulysses < 1 or self.ring < 1:
            raise ValueError(f"a usp group needs ulysses and ring degrees of at least 1; got ulysses "
                             f"{self.ulysses} x ring {self.ring}")

    @classmethod
    def of(cls, degree: int, ulysses: int) -> "UspLayout":
        """The layout of a group of `degree` ranks with ulysses subgroups of `ulysses` ranks."""
        if ulysses < 1 or degree % ulysses:
            raise ValueError(f"a usp group of {degree} ranks needs a ulysses degree that divides {degree}; "
                             f"got {ulysses}")
        return cls(ulysses, degree // ulysses)

    @property
    def degree(self) -> int:
        return self.ulysses * self.ring

    def subgroup(self, index: int) -> list[int]:
        """The ranks of `index`'s ulysses subgroup, in shard order (the all-to-all's peers)."""
        first = index - index % self.ulysses
        return list(range(first, first + self.ulysses))

    def same_heads(self, index: int) -> list[int]:
        """The ranks that hold the same heads as `index` after the all-to-all, one per subgroup, in subgroup
        order (the ring's peers)."""
        return list(range(index % self.ulysses, self.degree, self.ulysses))

    def blocks(self, shards: Shards) -> Blocks:
        """The ring's key/value blocks: each subgroup's tokens, in subgroup order."""
        return Blocks(shards, tuple(tuple(self.subgroup(s * self.ulysses)) for s in range(self.ring)))

    def subgroup_cut(self, shards: Shards, index: int) -> Blocks:
        """`index`'s subgroup as the all-to-all sees it: one block per rank."""
        return Blocks(shards, tuple((rank,) for rank in self.subgroup(index)))


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shards: Shards, index: int, ulysses: int,
                  peers: list[int] | None = None, key_mask: torch.Tensor | None = None,
                  scale: float | None = None, traffic: Traffic | None = None) -> torch.Tensor:
    """Attention of the whole sequence, computed by a group of `ulysses` x (degree / ulysses) ranks; returns
    this rank's rows.

    q, k, v: (B, H, L_i, D) with L_i = shards.sizes[index]; H must divide by `ulysses`. `peers`: the group's
    global ranks in shard order (default 0..N-1); this rank is peers[index]. key_mask: (B, L) bool over the whole
    joint sequence in joint order (True: the key takes part), the same on every rank. Returns (B, H, L_i, D).
    """
    layout = UspLayout.of(shards.degree, ulysses)
    peers = list(range(shards.degree)) if peers is None else list(peers)
    subgroup, ring = layout.subgroup(index), layout.same_heads(index)
    blocks = layout.blocks(shards)

    def ring_of_subgroups(gq, gk, gv, _, scale):  # (B, H/u, L_subgroup, D): the subgroup's tokens, these heads
        return ring_attention(gq, gk, gv, blocks, ring.index(index), [peers[i] for i in ring], key_mask, scale,
                              traffic)

    return ulysses_attention(q, k, v, layout.subgroup_cut(shards, index), subgroup.index(index),
                             [peers[i] for i in subgroup], scale=scale, attend=ring_of_subgroups, traffic=traffic)
