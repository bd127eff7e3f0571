"""usp (Unified Sequence Parallelism): ulysses and ring in one group of ring x ulysses devices per row group.
The token sequence is split over all of them; for each attention an all-to-all inside each ulysses subgroup
(adjacent devices) trades token shards for head shards, the devices that then hold the same heads pass the
subgroups' key/value blocks around a ring, and an all-to-all brings the output back (sequence/usp.py). Exact.
The heads must divide by the ulysses degree only, so it reaches degrees that ulysses alone cannot, with less
ring traffic than ring alone."""

from __future__ import annotations

import math

from .sequence.parallel import RING, ULYSSES, SequenceStrategy


class Usp(SequenceStrategy):
    name = "usp"
    kind = "usp"
    axes = ("ring", "ulysses")  # outer to inner: a ulysses subgroup's devices are adjacent
    knobs = (RING, ULYSSES)
    summary = ("a shard of the token sequence on each device; attention by heads inside ulysses subgroups, "
               "keys and values passed around a ring between them (DiTs).")

    def fill_degrees(self, given: tuple, devices: int, sequence) -> tuple[int, int]:
        """(ring, ulysses): a degree given is kept; those not given take the most of the `devices` they can,
        ulysses as many as the model's heads allow: neither given, ulysses the largest number dividing both the
        devices and the heads, ring the rest (2 devices, 24 heads: ring 1 x ulysses 2; 6 devices, 8 heads: ring 3
        x ulysses 2); ring given, ulysses the largest divisor of the heads that fits the devices left over ring.
        Heads unknown (no model yet): ring takes the devices, or with ring given ulysses takes the rest."""
        ring, ulysses = given
        heads = sequence.heads if sequence is not None else None
        if ulysses is None and not heads:
            ulysses = 1 if ring is None else max(1, devices // ring)
        elif ulysses is None and ring is None:
            ulysses = math.gcd(devices, heads)
        elif ulysses is None:
            ulysses = max(d for d in range(1, max(1, devices // ring) + 1) if heads % d == 0)
        return (ring or max(1, devices // ulysses), ulysses)

STRATEGY = Usp()
