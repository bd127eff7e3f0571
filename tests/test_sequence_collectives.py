"""Ulysses, ring and (on 4 ranks, 2 x 2) USP attention across real processes (gloo, point-to-point in issue
order as on NCCL): each rank holds a shard of seeded random q, k, v, and its output rows must equal torch's
attention on the whole sequence in one process. A dead or stalled peer must make the collective raise within
the group's timeout."""

from __future__ import annotations

import time

import pytest

from parallel_backend.strategies.sequence.ulysses import pipeline_chunks

pytestmark = pytest.mark.slow

RANK_SCRIPT = """
import functools, json, os, sys, time, torch
import torch.nn.functional as F
from parallel_backend.runtime import primitives
from parallel_backend.strategies.sequence import Shards, Traffic, ring_attention, ulysses_attention, usp_attention

torch.set_num_threads(1)
rank, world, rendezvous, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[5]
primitives.pair_in_issue_order()  # as NCCL pairs messages
primitives.join_group(rendezvous, rank, world, "cpu", timeout_s=6.0 if mode != "check" else 20.0)

def case(lengths, masked, peers):
    shards, index = Shards(lengths, world), peers.index(rank)
    gen = torch.Generator().manual_seed(sum(lengths))
    q, k, v = (torch.randn(2, 12, shards.length, 8, generator=gen) for _ in range(3))
    mask = torch.rand(2, shards.length, generator=gen) > 0.4 if masked else None
    if masked:
        mask[:, 0] = True
        mask[1, shards.positions(world - 1)] = False  # a block no query of row 1 sees (when it is not rank 0's)
    expected = shards.cut(F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if mask is None else mask[:, None, None, :]), index, 2)
    mine = [shards.cut(t, index, 2) for t in (q, k, v)]
    result = {"lengths": lengths, "masked": masked}
    attentions = [("ulysses", ulysses_attention), ("ring", ring_attention)]
    if world == 4:  # 2 subgroups of 2: an all-to-all inside each, a ring of 2 between them
        attentions.append(("usp", functools.partial(usp_attention, ulysses=2)))
    for name, attention in attentions:
        traffic = Traffic()
        out = attention(*mine, shards, index, peers=peers, key_mask=mask, traffic=traffic)
        result[name] = {"diff": (out - expected).abs().max().item() if out.numel() else 0.0,
                        "shape_ok": out.shape == expected.shape, "passes": traffic.passes}
    return result

if mode == "check":
    order = list(range(world))
    for lengths, masked, peers in [((13,), False, order), ((2,), True, order), ((5, 11), True, order[::-1])]:
        print(json.dumps(case(lengths, masked, peers)), flush=True)
    primitives.leave_group()
    sys.exit(0)
if rank == world - 1:  # the peer that fails: gone at once, or alive and silent
    if mode == "exit":
        os._exit(0)
    time.sleep(60)
time.sleep(0.3)
attention = {"ring": ring_attention, "ulysses": ulysses_attention}[sys.argv[6]]
started = time.monotonic()
try:
    attention(*(torch.ones(1, 12, 4, 8) for _ in range(3)), Shards.of(4 * world, world), rank)
    outcome = "returned"
except Exception as exc:
    outcome = "raised " + type(exc).__name__
print(json.dumps({"outcome": outcome, "seconds": time.monotonic() - started}), flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ulysses_ring_and_usp_on_shards_equal_full_attention_and_ring_takes_n_minus_1_passes(gloo_ranks, world):
    # cases: 13 tokens (uneven), 2 tokens (empty shards from 3 ranks on; on 4, a whole subgroup of USP empty)
    # with a key mask hiding a whole block, text 5 + image 11 tokens sharded stream by stream with the ranks in
    # reverse order around the ring
    expected = {"ulysses": 2, "ring": world - 1}
    if world == 4:  # 12 heads, 6 per subgroup rank: attended in 2 chunks, a ring of 2 (1 pass) for each
        expected["usp"] = 2 + pipeline_chunks(12 // 2) * 1
    for results in gloo_ranks(RANK_SCRIPT, world, "check"):
        assert len(results) == 3
        for result in results:
            assert set(result) - {"lengths", "masked"} == set(expected)
            for name, passes in expected.items():
                assert result[name]["shape_ok"] and result[name]["diff"] <= 1e-5, result
                assert result[name]["passes"] == passes, result


@pytest.mark.parametrize("attention", ["ring", "ulysses"])
@pytest.mark.parametrize("fault", ["exit", "stall"])
def test_a_dead_or_silent_peer_makes_the_exchange_raise_within_the_group_timeout(gloo_ranks, fault, attention):
    started = time.monotonic()
    # rank 2 fails; the group's timeout is 6 s
    outputs = gloo_ranks(RANK_SCRIPT, 3, fault, attention, wait_for=range(2))
    for [result] in outputs:
        assert result["outcome"].startswith("raised") and result["seconds"] < 15, result
    assert time.monotonic() - started < 60
