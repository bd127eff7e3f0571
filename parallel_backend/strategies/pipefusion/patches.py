"""Which tokens each patch of a pipefusion call holds, and where they sit in the sequence an attention sees.
Pure: no processes.

The image (video) tokens are cut into `patches` contiguous pieces in order. A joint-attention model's text tokens
go first: every patch holds about the same number of tokens in all (text included: a patch's cost is its
tokens'), each at least one image token, and the text fills the first patches (all of it patch 0 where it fits
in one patch's share, as at Flux's usual sizes: see the package's docstring for why). Where the text outweighs a
share (flux-small at 512 px: 256 text tokens of 1280), giving it all to patch 0 would make patch 0 the heaviest,
and the pipeline's fill (the later stages waiting for patch 0) longer by as much (20% of stage 0's time in
place of 1/8 at 8 patches); there the text runs over into patch 1 and on, whose text keys and values patch 0
then takes from the call before, as it does every later patch's image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...runtime.primitives import chunk_sizes

FIRST_ONLY = "text"  # the stream that goes first, with patch 0 where it fits (sequence_splits.TEXT)


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

    def text_sizes(self) -> list[int]:
        """Text tokens of each patch: the first patches' shares, less the one image token each keeps."""
        text, out = self.lengths.get(FIRST_ONLY, 0), []
        for size in chunk_sizes(self.lengths[self.main_stream] + text, self.count):
            out.append(min(text, size - 1))
            text -= out[-1]
        return out

    def main_sizes(self) -> list[int]:
        """Image (video) tokens of each patch."""
        total = self.lengths[self.main_stream] + self.lengths.get(FIRST_ONLY, 0)
        return [size - text for size, text in zip(chunk_sizes(total, self.count), self.text_sizes())]

    def ranges(self, patch: int) -> dict[str, range]:
        """The tokens of each stream that `patch` holds."""
        out = {}
        for stream, sizes in ((self.main_stream, self.main_sizes()), (FIRST_ONLY, self.text_sizes())):
            if stream in self.lengths:
                start = sum(sizes[:patch])
                out[stream] = range(start, start + sizes[patch])
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
