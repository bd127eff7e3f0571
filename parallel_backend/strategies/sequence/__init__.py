"""Sequence parallelism for DiTs, the model-independent part: each rank holds a contiguous shard of the token
sequence and the whole model, and attention, the one layer that mixes tokens, is computed by the group.

- shards.py: which tokens each rank holds (uneven shards, joint text + image sequences, empty shards), and
  runs of ranks taken as one block (`Blocks`);
- attention.py: attention to one block of keys with its log-sum-exp, and the exact merge of blocks;
- ulysses.py: all-to-all from token shards to head shards and back (heads must divide by the degree);
- ring.py: key/value blocks passed around the ring, merged with the online softmax, transfers overlapped;
- usp.py: both in one group: all-to-all inside ulysses subgroups, a ring among the subgroups;
- traffic.py: what each rank sent (passes, messages, bytes);
- group.py: one rank's view (cut, attend, gather); parallel.py: the strategies' shared host and worker side.
The exchanges go through `primitives` (the only module that calls torch.distributed). The model adapters
(models/*_sequence.py) place the split and the gather in each DiT family.
"""

from .attention import block_attention, merge
from .ring import RingAccumulator, RingPass, ring_attention, ring_schedule
from .shards import Blocks, Shards
from .traffic import Traffic
from .ulysses import heads_per_rank, ulysses_attention
from .usp import UspLayout, usp_attention

__all__ = ["Shards", "Blocks", "Traffic", "block_attention", "merge", "RingAccumulator", "RingPass",
           "ring_attention", "ring_schedule", "heads_per_rank", "ulysses_attention", "UspLayout", "usp_attention"]
