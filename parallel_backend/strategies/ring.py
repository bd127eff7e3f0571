"""ring: the token sequence split over the devices of each row group; each device keeps its queries while the
key/value shards travel around the ring (N-1 passes, the next transfer overlapped with the current attention),
merged with the online softmax. Exact; any number of heads."""

from __future__ import annotations

from .sequence.parallel import RING, SequenceStrategy


class Ring(SequenceStrategy):
    name = "ring"
    kind = "ring"
    axes = ("ring",)
    knobs = (RING,)
    summary = "a shard of the token sequence on each device; keys and values passed around a ring (DiTs)."


STRATEGY = Ring()
