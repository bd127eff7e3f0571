"""usp (Unified Sequence Parallelism): ulysses and ring in one group of ring x ulysses devices per row group.
The token sequence is split over all of them; for each attention an all-to-all inside each ulysses subgroup
(adjacent devices) trades token shards for head shards, the devices that then hold the same heads pass the
subgroups' key/value blocks around a ring, and an all-to-all brings the output back (sequence/usp.py). Exact.
The heads must divide by the ulysses degree only, so it reaches degrees that ulysses alone cannot, with less
ring traffic than ring alone."""

from __future__ import annotations

from .sequence.parallel import SequenceStrategy


class Usp(SequenceStrategy):
    name = "usp"
    kind = "usp"
    axes = ("ring", "ulysses")  # outer to inner: a ulysses subgroup's devices are adjacent
    summary = ("a shard of the token sequence on each device; attention by heads inside ulysses subgroups, "
               "keys and values passed around a ring between them (DiTs).")


STRATEGY = Usp()
