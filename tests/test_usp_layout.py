"""USP without processes: which ranks of a ulysses x ring group exchange with which, the ring's blocks, and the
whole layout simulated on a list of ranks (Ulysses' all-to-all inside each subgroup, the subgroups' blocks
around the ring of the ranks holding the same heads, the all-to-all back) against torch's attention on the
whole sequence; the mesh and group refusals; the bench's stand-in for a usp rank."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parallel_backend.strategies.sequence import RingAccumulator, Shards, UspLayout, ring_schedule, ulysses
from parallel_backend.strategies.sequence.group import SequenceGroup
from parallel_backend.strategies.sequence.stub import StubGroup

# (stream lengths, ulysses, ring): uneven shards, a subgroup with no token at all (2 tokens on 4 ranks), text +
# image streams, 3 x 2 and 2 x 3, and the two ends (u = 1: ring, r = 1: ulysses)
CASES = [((13,), 2, 2), ((2,), 2, 2), ((5, 11), 2, 3), ((3, 10), 3, 2), ((7,), 1, 3), ((9,), 3, 1)]


def simulate(q, k, v, shards: Shards, layout: UspLayout, key_mask):
    """Every rank's output of a usp attention, the exchanges done by indexing lists (rank i's s-th received
    piece is rank s's piece for i)."""
    ranks = range(layout.degree)
    place = [layout.subgroup(i).index(i) for i in ranks]  # a rank's position in its subgroup: its heads
    sent = [ulysses.to_heads(torch.stack([shards.cut(t, i, 2) for t in (q, k, v)]), layout.ulysses) for i in ranks]
    gathered = [ulysses.join_tokens([sent[s][place[i]] for s in layout.subgroup(i)]) for i in ranks]
    blocks = layout.blocks(shards)
    outs = []
    for i in ranks:
        ring = layout.same_heads(i)
        accumulator = RingAccumulator(gathered[i][0])
        for step in ring_schedule(layout.ring, ring.index(i)):
            holder = gathered[ring[step.holds]]  # the rank of subgroup step.holds with these heads
            mask = None if key_mask is None else key_mask[:, blocks.positions(step.holds)]
            accumulator.add(holder[1], holder[2], mask)
        outs.append(ulysses.to_tokens(accumulator.result()[0], layout.subgroup_cut(shards, i)))
    return [ulysses.join_heads([outs[s][place[i]] for s in layout.subgroup(i)]) for i in ranks]


@pytest.mark.parametrize("lengths, u, r", CASES)
def test_subgroups_are_adjacent_and_each_ring_takes_the_same_heads_from_every_subgroup(lengths, u, r):
    layout = UspLayout(u, r)
    for i in range(u * r):
        assert layout.subgroup(i) == list(range(i // u * u, i // u * u + u))
        ring = layout.same_heads(i)
        assert [rank // u for rank in ring] == list(range(r)) and {rank % u for rank in ring} == {i % u}
    blocks = layout.blocks(Shards(lengths, u * r))
    shards = Shards(lengths, u * r)
    assert blocks.degree == r and sum(blocks.sizes) == shards.length
    assert blocks.gathered_positions() == shards.gathered_positions()  # subgroups in order: ranks in order
    assert layout.subgroup_cut(shards, u * r - 1).sizes == shards.sizes[-u:]


@pytest.mark.parametrize("lengths, u, r", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_usp_simulated_on_ranks_equals_full_attention(lengths, u, r, masked):
    shards, layout = Shards(lengths, u * r), UspLayout(u, r)
    generator = torch.Generator().manual_seed(u * 10 + r)
    q, k, v = (torch.randn(2, 6, shards.length, 8, generator=generator) for _ in range(3))
    key_mask = None
    if masked:
        key_mask = torch.rand(2, shards.length, generator=generator) > 0.4
        key_mask[:, 0] = True
        key_mask[0, layout.blocks(shards).positions(r - 1)] = False  # a whole ring block no query of row 0 sees
        key_mask[0, 0] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=None if key_mask is None else key_mask[:, None, None])
    for i, out in enumerate(simulate(q, k, v, shards, layout, key_mask)):
        mine = shards.cut(expected, i, 2)
        assert out.shape == mine.shape and not out.isnan().any()
        assert torch.allclose(out, mine, atol=1e-5, rtol=0)  # an empty shard: nothing to compare, trivially true


def test_a_usp_group_needs_a_ulysses_degree_that_divides_it_and_the_heads():
    with pytest.raises(ValueError, match="a usp group of 4 ranks needs a ulysses degree that divides 4; got 3"):
        SequenceGroup("usp", (0, 1, 2, 3), 0, "cpu", ulysses=3)
    with pytest.raises(ValueError, match="a usp group needs its ulysses degree"):
        SequenceGroup("usp", (0, 1, 2, 3), 0, "cpu")
    with pytest.raises(ValueError, match="a ring group of 2 ranks has ulysses degree 1; got 2"):
        SequenceGroup("ring", (0, 1), 0, "cpu", ulysses=2)
    group = SequenceGroup("usp", (0, 1, 2, 3, 4, 5), 0, "cpu", ulysses=3)
    group.check_heads(6)
    with pytest.raises(ValueError, match="ulysses degree 3 does not divide the model's 8 attention heads: use ring"):
        group.check_heads(8)


@pytest.mark.parametrize("kind, degree, u", [("usp", 4, 2), ("ring", 3, None), ("ulysses", 2, None)])
def test_the_bench_stub_attends_a_ranks_share_without_any_exchange(kind, degree, u):
    group = StubGroup(kind, degree, u)
    shards = Shards((3, 10), degree)
    q, k, v = (torch.randn(1, 4, shards.sizes[0], 8) for _ in range(3))
    out = group.attention(q, k, v, shards)
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert group.all_gather(out, shards, 2).shape[2] == shards.length
    assert group.traffic.passes == 0  # nothing crossed


def test_bench_part_runs_a_usp_rank_of_flux_small():
    from parallel_backend import strategies
    from parallel_backend.engine.oracle import sample_call
    from parallel_backend.models.benchmodels import build_bench_model
    from parallel_backend.engine.config import ParallelConfig
    from parallel_backend.engine.mesh import resolve

    model = build_bench_model("flux-small")  # 8 heads: 4 per rank of a ulysses-2 subgroup
    mesh = resolve(ParallelConfig("cpu:4", "usp", ulysses=2), 4, 1, 1)
    assert mesh.degrees() == {"cfg": 1, "batch": 1, "ring": 2, "ulysses": 2}
    part = strategies.get("usp").bench_part(model, sample_call(model, 1, (64, 64)), mesh)
    part()  # raises if any exchange were attempted: no process group exists here
