"""Which tokens each rank of a sequence-parallel group holds. Pure: no processes.

A token sequence is one or several streams attended together (Flux: the text tokens, then the image tokens).
Each stream is cut into `degree` contiguous, near-equal pieces (the first pieces one token longer when the
length does not divide), and rank r holds piece r of every stream, in stream order: its local sequence is
[text piece r, image piece r]. Cutting stream by stream keeps every rank's share of text and of image tokens
balanced, whatever the two lengths are.

Why this is exact: in attention, each query's output depends only on the set of (key, value) pairs it sees,
not on their order (softmax and the weighted sum are sums over keys), and each query is computed on its own.
So the keys may be gathered in any order (Ulysses gathers them rank by rank: [text 0, image 0, text 1, ...]),
and each output returns to the rank and position its query came from. What must follow the same cut is
everything per token: positional ids or RoPE frequencies, and a key mask (`positions` gives the indices).

With `weights` (one per rank: ring on mixed devices, speeds.py) each stream is cut in proportion to them instead
(`speeds.weighted_sizes`); everything below works on any sizes.

Ranks may hold no token (a sequence shorter than the degree, or a short stream): every function here and the
collectives built on it accept empty shards (nothing crosses for them, attention of an empty shard of queries
is empty). Whether a model layer accepts an empty shard is the model adapter's concern.

`Blocks` takes runs of ranks as one block each (USP: a ulysses subgroup's tokens are one key/value block of its
ring); it answers what the collectives ask of a cut (degree, sizes, positions), so they take either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...runtime.primitives import chunk_sizes


@dataclass(frozen=True)
class Shards:
    """The cut of a joint sequence of streams of `lengths` tokens (in joint order) over `degree` ranks."""

    lengths: tuple[int, ...]
    degree: int
    weights: tuple[float, ...] | None = None  # one per rank: shares in proportion to them (None: near-equal)

    def __post_init__(self):
        object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
        if self.weights is not None and (len(self.weights) != self.degree or min(self.weights) <= 0):
            raise ValueError(f"a sequence split over {self.degree} ranks needs one positive weight per rank; got "
                             f"{list(self.weights)}")
        if self.degree < 1:
            raise ValueError(f"a sequence split needs a degree of at least 1; got {self.degree}")
        if not self.lengths or min(self.lengths) < 0 or sum(self.lengths) < 1:
            raise ValueError(f"a sequence split needs at least one token and no negative stream length; "
                             f"got stream lengths {list(self.lengths)}")

    @classmethod
    def of(cls, length: int, degree: int) -> "Shards":
        """A single stream of `length` tokens."""
        return cls((length,), degree)

    @property
    def length(self) -> int:
        return sum(self.lengths)

    def stream_sizes(self, stream: int) -> list[int]:
        """Tokens of `stream` on each rank."""
        if self.weights is not None:
            from ...runtime.speeds import weighted_sizes

            return weighted_sizes(self.lengths[stream], self.weights)
        return chunk_sizes(self.lengths[stream], self.degree)

    def local_sizes(self, rank: int) -> list[int]:
        """Tokens of each stream on `rank`, in stream order (they sum to sizes[rank])."""
        return [self.stream_sizes(s)[rank] for s in range(len(self.lengths))]

    @property
    def sizes(self) -> list[int]:
        """Tokens on each rank (the length of its local sequence)."""
        return [sum(self.local_sizes(r)) for r in range(self.degree)]

    def positions(self, rank: int) -> list[int]:
        """The joint positions of `rank`'s tokens, in its local order."""
        out, offset = [], 0
        for s, length in enumerate(self.lengths):
            sizes = self.stream_sizes(s)
            start = offset + sum(sizes[:rank])
            out += range(start, start + sizes[rank])
            offset += length
        return out

    def gathered_positions(self) -> list[int]:
        """The joint positions of all tokens laid out rank after rank (each in its local order): the order of the
        keys a Ulysses rank holds after the all-to-all, and of the blocks around a ring."""
        return [p for r in range(self.degree) for p in self.positions(r)]

    def cut(self, x: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
        """`rank`'s tokens of `x` (the whole joint sequence along `dim`), in local order."""
        if x.shape[dim] != self.length:
            raise ValueError(f"cannot cut a sequence of {x.shape[dim]} tokens (dim {dim}) with a split of "
                             f"{self.length} tokens")
        pieces, offset = [], 0
        for s, length in enumerate(self.lengths):
            sizes = self.stream_sizes(s)
            pieces.append(x.narrow(dim, offset + sum(sizes[:rank]), sizes[rank]))
            offset += length
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)

    def join(self, pieces: list[torch.Tensor], dim: int) -> torch.Tensor:
        """The whole joint sequence from every rank's local tokens (`pieces[r]` from rank r); undoes `cut`."""
        if len(pieces) != self.degree:
            raise ValueError(f"joining a sequence split over {self.degree} ranks needs {self.degree} pieces; "
                             f"got {len(pieces)}")
        parts = [piece.split(self.local_sizes(r), dim) for r, piece in enumerate(pieces)]
        return torch.cat([parts[r][s] for s in range(len(self.lengths)) for r in range(self.degree)], dim)


@dataclass(frozen=True)
class Blocks:
    """The ranks of `shards` in runs, each run one block of tokens: block b holds the tokens of the ranks
    runs[b], rank after rank, each in its local order (the order an all-to-all among them gathers them in)."""

    shards: Shards
    runs: tuple[tuple[int, ...], ...]

    @property
    def degree(self) -> int:
        return len(self.runs)

    @property
    def sizes(self) -> list[int]:
        """Tokens in each block."""
        sizes = self.shards.sizes
        return [sum(sizes[rank] for rank in run) for run in self.runs]

    def positions(self, block: int) -> list[int]:
        """The joint positions of `block`'s tokens, in its order."""
        return [p for rank in self.runs[block] for p in self.shards.positions(rank)]

    def gathered_positions(self) -> list[int]:
        return [p for block in range(self.degree) for p in self.positions(block)]
