"""ulysses: the token sequence split over the devices of each row group; before attention an all-to-all trades
token shards for head shards (each device then attends all tokens with its share of the heads), after it the
reverse. Exact. The heads must divide by the degree; ring has no such limit."""

from __future__ import annotations

from .sequence.parallel import ULYSSES, SequenceStrategy


class Ulysses(SequenceStrategy):
    name = "ulysses"
    kind = "ulysses"
    axes = ("ulysses",)
    knobs = (ULYSSES,)
    summary = "a shard of the token sequence on each device; attention by heads after an all-to-all (DiTs)."


STRATEGY = Ulysses()
