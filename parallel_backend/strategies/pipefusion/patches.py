"""Which tokens each patch of a pipefusion call holds, and where they sit in the sequence an attention sees.
Pure: no processes.

The image (video) tokens are cut into `patches` contiguous pieces in order. A joint-attention model's text tokens
all go with patch 0 (see the package's docstring for why), and the image tokens are shared so that every patch
holds about the same number of tokens in all (text included: a patch's cost is its tokens'), each at least one.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...runtime.primitives import chunk_sizes

FIRST_ONLY = "text"  # the stream that goes whole with patch 0 (sequence_splits.TEXT)


@dataclass(frozen=True)
class Patches:
    """The cut of one call's streams (`lengths`: stream -> tokens) into `count` patches."""

    lengths: dict
    count: int

    def __post_init__(self):
        main = self.main_stream
        if self.count < 1 or self.lengths[main] < self.count:
            raise ValueError(f"pipefusion cannot cut {self.lengths[main]} {main} tokens into {self.count} patches (each "
                             "needs one); use fewer patches (--patches) or a larger image")

    @property
    def main_stream(self) -> str:
        return next(s for s in self.lengths if s != FIRST_ONLY)

    def main_sizes(self) -> list[int]:
        """Image (video) tokens of each patch."""
        main, text = self.lengths[self.main_stream], self.lengths.get(FIRST_ONLY, 0)
        if self.count == 1 or not text:
            return chunk_sizes(main, self.count)
        first = min(max(1, round((main + text) / self.count) - text), main - (self.count - 1))
        return [first, *chunk_sizes(main - first, self.count - 1)]

    def ranges(self, patch: int) -> dict[str, range]:
        """The tokens of each stream that `patch` holds."""
        sizes = self.main_sizes()
        start = sum(sizes[:patch])
        out = {self.main_stream: range(start, start + sizes[patch])}
        if FIRST_ONLY in self.lengths:
            out[FIRST_ONLY] = range(0, self.lengths[FIRST_ONLY] if patch == 0 else 0)
        return out

    def positions(self, patch: int, joint: tuple[str, ...]) -> list[int]:
        """`patch`'s tokens' positions in the joint sequence of `joint` (streams in the attention's order), in
        the order the patch's own tokens are joined there."""
        ranges, out, offset = self.ranges(patch), [], 0
        for stream in joint:
            out += [offset + i for i in ranges[stream]]
            offset += self.lengths[stream]
        return out

    def tokens(self, patch: int) -> int:
        return sum(len(r) for r in self.ranges(patch).values())
