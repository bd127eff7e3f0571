"""One rank's view of a sequence-parallel group: what a model adapter calls to cut, attend and gather.

A family's row (models/sequence_splits.py, applied by models/sequence_hooks.py) says where a family forms and
gathers its token sequence; the hooks ask the group which tokens this rank holds (`shards`), has every token-mixing attention computed by the group
(`attention`: Ulysses, ring or both (USP), per `kind`) and joins the ranks' output pieces (`all_gather`). The
exchanges go through `primitives` (the only module that calls torch.distributed), and every round this rank
sends in is counted in `traffic`: a Ulysses attention is 2 passes, a ring attention N-1, a USP attention 2 plus
r-1 per chunk of heads (usp.py), an all-gather 1.

A group of degree 1 exchanges nothing (no process group is needed), which makes the adapters testable in one
process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from ...runtime import primitives
from .ring import ring_attention
from .shards import Shards
from .traffic import Traffic, timed_wait
from .ulysses import heads_per_rank, ulysses_attention
from .usp import UspLayout, usp_attention

KINDS = ("ulysses", "ring", "usp")


@dataclass
class SequenceGroup:
    """This rank's place in a group of ranks that split one token sequence.

    kind: "ulysses" (all-to-all to head shards), "ring" (key/value blocks around the ring) or "usp" (both: an
    all-to-all inside subgroups of `ulysses` ranks, a ring among the subgroups); peers: the group's global ranks
    in shard order; index: this rank's position in peers; traffic: what this rank sent; ulysses: the ranks that
    split the heads (usp: given; ulysses: the whole group; ring: 1); weights: one per peer, token shards in
    proportion to them (ring on mixed devices; None: near-equal)."""

    kind: str
    peers: tuple[int, ...]
    index: int
    device: torch.device
    traffic: Traffic = field(default_factory=Traffic)
    ulysses: int | None = None
    weights: tuple[float, ...] | None = None

    def __post_init__(self):
        self.peers = tuple(int(p) for p in self.peers)
        self.device = torch.device(self.device)
        if self.kind not in KINDS:
            raise ValueError(f"a sequence group is one of {', '.join(KINDS)}; got {self.kind!r}")
        if not self.peers or len(set(self.peers)) != len(self.peers):
            raise ValueError(f"a sequence group needs distinct peers; got {list(self.peers)}")
        if not 0 <= self.index < len(self.peers):
            raise ValueError(f"index {self.index} is not a position in a group of {len(self.peers)} peers")
        implied = {"ulysses": self.degree, "ring": 1}.get(self.kind)
        if implied is not None and self.ulysses not in (None, implied):
            raise ValueError(f"a {self.kind} group of {self.degree} ranks has ulysses degree {implied}; got "
                             f"{self.ulysses}")
        if implied is None and self.ulysses is None:
            raise ValueError("a usp group needs its ulysses degree (the ranks of each subgroup)")
        self.ulysses = UspLayout.of(self.degree, implied or self.ulysses).ulysses

    @property
    def degree(self) -> int:
        return len(self.peers)

    def shards(self, *stream_lengths: int) -> Shards:
        """The cut of a joint sequence of streams of these lengths (in joint order) over the group."""
        return Shards(stream_lengths, self.degree, self.weights)

    def check_heads(self, heads: int) -> None:
        """Raises, before any work, when this group cannot split a model with `heads` attention heads (Ulysses
        needs its degree to divide them; the sentence names ring)."""
        heads_per_rank(heads, self.ulysses)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shards: Shards,
                  key_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
        """Attention of this rank's queries to the whole joint sequence: q, k, v (B, H, L_r, D) for this rank's
        tokens (L_r = shards.sizes[index]) -> (B, H, L_r, D) in q's dtype. key_mask: (B, L) bool over the whole
        joint sequence (True: the key takes part), the same on every rank. Every rank of the group must call it."""
        attend = {"ulysses": ulysses_attention, "ring": ring_attention,
                  "usp": partial(usp_attention, ulysses=self.ulysses)}[self.kind]
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
        started = primitives.start_all_to_all(pieces, shapes, list(self.peers), self.index, self.device)
        received = timed_wait(self.traffic, primitives.finish_all_to_all, started)
        self.traffic.record([piece] * (self.degree - 1))
        return shards.join(received, dim)
