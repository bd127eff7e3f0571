"""One rank's view of a sequence-parallel group: what a model adapter calls to cut, attend and gather.

A model adapter (models/diffusers_sequence.py) knows where a family forms and gathers its token sequence; it
asks the group which tokens this rank holds (`shards`), has every token-mixing attention computed by the group
(`attention`: Ulysses or ring, per `kind`) and joins the ranks' output pieces (`all_gather`). The exchanges go
through `primitives` (the only module that calls torch.distributed), and every round this rank sends in is
counted in `traffic`: a Ulysses attention is 2 passes, a ring attention N-1, an all-gather 1.

A group of degree 1 exchanges nothing (no process group is needed), which makes the adapters testable in one
process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ... import primitives
from .ring import ring_attention
from .shards import Shards
from .traffic import Traffic
from .ulysses import heads_per_rank, ulysses_attention

KINDS = ("ulysses", "ring")


@dataclass
class SequenceGroup:
    """This rank's place in a group of ranks that split one token sequence.

    kind: "ulysses" (all-to-all to head shards) or "ring" (key/value blocks around the ring); peers: the group's
    global ranks in shard order; index: this rank's position in peers; traffic: what this rank sent."""

    kind: str
    peers: tuple[int, ...]
    index: int
    device: torch.device
    traffic: Traffic = field(default_factory=Traffic)

    def __post_init__(self):
        self.peers = tuple(int(p) for p in self.peers)
        self.device = torch.device(self.device)
        if self.kind not in KINDS:
            raise ValueError(f"a sequence group is one of {', '.join(KINDS)}; got {self.kind!r}")
        if not self.peers or len(set(self.peers)) != len(self.peers):
            raise ValueError(f"a sequence group needs distinct peers; got {list(self.peers)}")
        if not 0 <= self.index < len(self.peers):
            raise ValueError(f"index {self.index} is not a position in a group of {len(self.peers)} peers")

    @property
    def degree(self) -> int:
        return len(self.peers)

    def shards(self, *stream_lengths: int) -> Shards:
        """The cut of a joint sequence of streams of these lengths (in joint order) over the group."""
        return Shards(stream_lengths, self.degree)

    def check_heads(self, heads: int) -> None:
        """Raises, before any work, when this group cannot split a model with `heads` attention heads (Ulysses
        needs the degree to divide them; the sentence names ring)."""
        if self.kind == "ulysses":
            heads_per_rank(heads, self.degree)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shards: Shards,
                  key_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
        """Attention of this rank's queries to the whole joint sequence: q, k, v (B, H, L_r, D) for this rank's
        tokens (L_r = shards.sizes[index]) -> (B, H, L_r, D) in q's dtype. key_mask: (B, L) bool over the whole
        joint sequence (True: the key takes part), the same on every rank. Every rank of the group must call it."""
        attend = ulysses_attention if self.kind == "ulysses" else ring_attention
        return attend(q, k, v, shards, self.index, peers=list(self.peers), key_mask=key_mask, scale=scale,
                      traffic=self.traffic).to(q.dtype)

    def all_gather(self, piece: torch.Tensor, shards: Shards, dim: int) -> torch.Tensor:
        """The whole tensor from every rank's `piece` (this rank's tokens along `dim`, as `shards.cut` gives
        them): the same on every rank. The sizes come from the plan, so nothing but the pieces crosses."""
        sizes = shards.sizes
        if piece.shape[dim] != sizes[self.index]:
            raise ValueError(f"rank {self.index} of the group holds {sizes[self.index]} tokens; its piece has "
                             f"{piece.shape[dim]} along dim {dim}")
        dim = dim % piece.dim()
        shapes = [(*piece.shape[:dim], size, *piece.shape[dim + 1:]) for size in sizes]
        pieces = [piece] * self.degree
        received = primitives.all_to_all(pieces, shapes, list(self.peers), self.index, self.device)
        self.traffic.record([piece] * (self.degree - 1))
        return shards.join(received, dim)
