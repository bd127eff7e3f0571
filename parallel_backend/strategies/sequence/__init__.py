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

# Each name loads with its module (torch) when first used: the strategy registry imports parallel.py from this
# package, and loads without torch.
_WHERE = {"block_attention": "attention", "merge": "attention", "RingAccumulator": "ring", "RingPass": "ring",
          "ring_attention": "ring", "ring_schedule": "ring", "Blocks": "shards", "Shards": "shards",
          "Traffic": "traffic", "heads_per_rank": "ulysses", "ulysses_attention": "ulysses", "UspLayout": "usp",
          "usp_attention": "usp"}
__all__ = list(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
