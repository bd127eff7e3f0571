"""Sequence parallelism without processes: the shard plan, the Ulysses layout, the ring schedule and the block
merge, each rank simulated as an entry of a list, checked against torch's attention on the whole sequence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parallel_backend.strategies.sequence import (RingAccumulator, Shards, block_attention, heads_per_rank, merge,
                                                  ring_schedule)
from parallel_backend.strategies.sequence import ulysses

SPLITS = [((13,), 3), ((2,), 3), ((1,), 4), ((8,), 1), ((5, 11), 3), ((0, 7), 2), ((3, 2), 4)]


def reference(q, k, v, key_mask=None):
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def random_qkv(length, heads=6, batch=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, dim, generator=gen) for _ in range(3)]


def key_mask_with_a_blind_block(shards: Shards, batch=2, seed=1):
    """Random keys masked, and for batch row 0 every key of the last non-empty shard but one, so some ring block is
    masked entirely for its queries; each row keeps at least one key."""
    mask = torch.rand(batch, shards.length, generator=torch.Generator().manual_seed(seed)) > 0.3
    nonempty = [r for r in range(shards.degree) if shards.sizes[r]]
    if len(nonempty) > 1:
        mask[0, shards.positions(nonempty[-1])] = False
    mask[:, shards.positions(nonempty[0])[0]] = True
    return mask


@pytest.mark.parametrize("lengths,degree", SPLITS)
def test_shards_cover_the_sequence_once_and_cut_then_join_is_the_identity(lengths, degree):
    shards = Shards(lengths, degree)
    x = torch.arange(shards.length).repeat(2, 1)
    cuts = [shards.cut(x, r, dim=1) for r in range(degree)]
    assert [c.shape[1] for c in cuts] == shards.sizes
    assert all(cuts[r][0].tolist() == shards.positions(r) for r in range(degree))
    assert sorted(shards.gathered_positions()) == list(range(shards.length))
    assert torch.equal(shards.join(cuts, dim=1), x)
    assert max(shards.sizes) - min(shards.sizes) <= len(lengths)  # each stream near-equal on every rank


def test_shards_are_contiguous_per_stream_and_uneven_at_the_front():
    assert Shards.of(13, 3).sizes == [5, 4, 4] and Shards.of(2, 3).sizes == [1, 1, 0]
    joint = Shards((3, 10), 3)  # text 0..2, image 3..12
    assert joint.positions(0) == [0, 3, 4, 5, 6] and joint.positions(2) == [2, 10, 11, 12]
    with pytest.raises(ValueError, match="at least one token"):
        Shards.of(0, 2)
    with pytest.raises(ValueError, match="degree"):
        Shards.of(4, 0)


def test_ulysses_refuses_heads_that_its_degree_does_not_divide_and_names_ring():
    assert heads_per_rank(12, 4) == 3
    with pytest.raises(ValueError, match="use ring"):
        heads_per_rank(6, 4)


@pytest.mark.parametrize("lengths,degree", [((13,), 3), ((2,), 3), ((5, 11), 2), ((3, 2), 3)])
@pytest.mark.parametrize("masked", [False, True])
def test_ulysses_layout_simulated_on_ranks_equals_full_attention(lengths, degree, masked):
    shards = Shards(lengths, degree)
    q, k, v = random_qkv(shards.length)
    mask = key_mask_with_a_blind_block(shards) if masked else None
    ranks = range(degree)
    sent = [ulysses.to_heads(torch.stack([shards.cut(t, r, 2) for t in (q, k, v)]), degree) for r in ranks]
    gathered = [ulysses.join_tokens([sent[s][r] for s in ranks]) for r in ranks]  # rank r gets piece r of each
    heads = heads_per_rank(q.shape[1], degree)
    order = shards.gathered_positions()
    for r in ranks:  # all tokens of this rank's heads, rank after rank
        assert torch.equal(gathered[r][0], q[:, r * heads:(r + 1) * heads, order])
    gathered_mask = None if mask is None else mask[:, order]
    outs = [ulysses.sdpa(*gathered[r].unbind(0), gathered_mask, None) for r in ranks]
    back = [ulysses.to_tokens(outs[r], shards) for r in ranks]
    result = [ulysses.join_heads([back[s][r] for s in ranks]) for r in ranks]
    expected = reference(q, k, v, mask)
    for r in ranks:
        assert max_diff(result[r], shards.cut(expected, r, 2)) <= 1e-5


@pytest.mark.parametrize("degree", [1, 2, 3, 4, 5])
def test_ring_schedule_visits_every_block_once_and_receives_what_the_previous_rank_forwards(degree):
    plans = [ring_schedule(degree, r) for r in range(degree)]
    for r, plan in enumerate(plans):
        assert sorted(p.holds for p in plan) == list(range(degree))
        assert sum(p.forwards for p in plan) == degree - 1
        for p in plan[:-1]:  # what arrives in pass p is what rank r-1 holds (and forwards) in pass p
            assert p.receives == plans[(r - 1) % degree][p.step].holds == plan[p.step + 1].holds


@pytest.mark.parametrize("lengths,degree", [((13,), 3), ((2,), 3), ((5, 11), 4), ((9,), 2), ((4, 0), 3)])
@pytest.mark.parametrize("masked", [False, True])
def test_ring_blocks_merged_in_schedule_order_equal_full_attention(lengths, degree, masked):
    shards = Shards(lengths, degree)
    q, k, v = random_qkv(shards.length, seed=degree)
    mask = key_mask_with_a_blind_block(shards) if masked else None
    expected = reference(q, k, v, mask)
    for r in range(degree):
        accumulator = RingAccumulator(shards.cut(q, r, 2))
        for step in ring_schedule(degree, r):
            block_mask = None if mask is None else mask[:, shards.positions(step.holds)]
            accumulator.add(shards.cut(k, step.holds, 2), shards.cut(v, step.holds, 2), block_mask)
        out, lse = accumulator.result()
        assert not out.isnan().any() and not lse.isnan().any()
        assert max_diff(out, shards.cut(expected, r, 2)) <= 1e-5


def test_a_block_with_every_key_masked_has_lse_minus_infinity_and_merges_without_nans():
    q, k, v = random_qkv(5)
    blind = block_attention(q, k, v, key_mask=torch.zeros(2, 5, dtype=torch.bool))
    assert torch.isneginf(blind[1]).all() and (blind[0] == 0).all()
    seen = block_attention(q, k, v)
    out, lse = merge(blind, seen)
    assert torch.equal(out, seen[0]) and torch.equal(lse, seen[1])
    out, lse = merge(blind, blind)  # nothing seen on either side: still no NaN
    assert torch.isneginf(lse).all() and (out == 0).all()
    empty = block_attention(q, k[:, :, :0], v[:, :, :0])  # an empty shard's block
    assert torch.isneginf(empty[1]).all() and (empty[0] == 0).all()


def test_block_lse_is_the_log_sum_exp_of_the_scaled_scores():
    q, k, v = random_qkv(7)
    out, lse = block_attention(q, k, v, scale=0.5)
    assert torch.allclose(lse, torch.logsumexp(q @ k.transpose(-2, -1) * 0.5, -1), atol=1e-6)
    assert max_diff(out, F.scaled_dot_product_attention(q, k, v, scale=0.5)) <= 1e-5


def test_the_fused_kernel_and_the_plain_math_give_the_same_block_attention():
    generator = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, n, 8, generator=generator) for n in (5, 7, 7))
    fused = block_attention(q, k, v, 0.3)
    plain = block_attention(q, k, v, 0.3, key_mask=torch.ones(2, 7, dtype=torch.bool))  # a mask takes the math form
    assert (fused[0] - plain[0]).abs().max() <= 1e-5 and (fused[1] - plain[1]).abs().max() <= 1e-5


def test_a_refusing_fused_kernel_falls_back_to_the_plain_math_and_says_so_once(monkeypatch, caplog):
    from parallel_backend.strategies.sequence import attention

    def refuse(*args, **kwargs):
        raise RuntimeError("stand-in refusal: no kernel for this input\nsecond line of the error")

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", refuse)
    monkeypatch.setattr(attention, "_REFUSALS_SAID", set())
    q, k, v = random_qkv(7)
    with caplog.at_level("WARNING", logger="tandem"):
        for _ in range(3):
            out, lse = block_attention(q, k, v, scale=0.5)
    assert max_diff(out, F.scaled_dot_product_attention(q, k, v, scale=0.5)) <= 1e-5
    said = [r.getMessage() for r in caplog.records if r.name == "tandem" and "attention kernel refused" in r.getMessage()]
    assert len(said) == 1, said
    assert "cpu float32 input (RuntimeError: stand-in refusal: no kernel for this input)" in said[0]
    assert "plain float32 form" in said[0] and "slower" in said[0]
