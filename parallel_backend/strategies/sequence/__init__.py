"""Sequence parallelism for DiTs, the model-independent part: each rank holds a contiguous shard of the token
sequence and the whole model, and attention, the one layer that mixes tokens, is computed by the group.

- shards.py: which tokens each rank holds (uneven shards, joint text + image sequences, empty shards);
- attention.py: attention to one block of keys with its log-sum-exp, and the exact merge of blocks;
- ulysses.py: all-to-all from token shards to head shards and back (heads must divide by the degree);
- ring.py: key/value blocks passed around the ring, merged with the online softmax, transfers overlapped;
- traffic.py: what each rank sent (passes, messages, bytes).
The exchanges go through `primitives` (the only module that calls torch.distributed). Not registered as
strategies yet: that needs the model adapters that place the split and the gather in each DiT family.
"""

from .attention import block_attention, merge
from .ring import RingAccumulator, RingPass, ring_attention, ring_schedule
from .shards import Shards
from .traffic import Traffic
from .ulysses import heads_per_rank, ulysses_attention

__all__ = ["Shards", "Traffic", "block_attention", "merge", "RingAccumulator", "RingPass", "ring_attention",
           "ring_schedule", "heads_per_rank", "ulysses_attention"]
