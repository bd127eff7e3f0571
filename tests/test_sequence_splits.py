"""Sequence splits as data (models/sequence_splits.py, applied by models/sequence_hooks.py).

Adding a family is a table row: a toy DiT (plain torch, ComfyUI's call and attention-override contract) gets a
row registered here, and split over 2 gloo processes (ulysses, ring) it returns the one-process forward, with one
exchange per joint attention and one gather; in one process (a group of degree 1 exchanges nothing) it equals
the forward, refuses what its row refuses and leaves the model as it was. Every row of the table is checked for
what the mechanism needs (its streams measured before they are used); the rows themselves run against their
hosts' real models in tests/test_sequence_dit.py (diffusers) and tests/comfy/test_sequence_families.py.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from parallel_backend.runtime.calls import ModelCall
from parallel_backend.models import comfy_sequence, sequence_splits
from parallel_backend.models.sequence_splits import IMAGE, TEXT, Attend, Cut, Gather, Refuse, SequenceSplit
from parallel_backend.strategies.sequence.group import SequenceGroup

pytestmark = pytest.mark.pool


TOY_ROW = SequenceSplit(
    "Toy DiT", "heads",
    attend=(Attend("blocks.*.attn", (TEXT, IMAGE)),),
    gather=Gather("proj_out", IMAGE),
    cuts={"": {"x": Cut(IMAGE), "context": Cut(TEXT)}, "blocks.*": {"pe": Cut((TEXT, IMAGE))}},
    refuse=(Refuse("mask", "a toy mask"),))


def _attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
               **kwargs):
    """The host's own attention (ComfyUI's contract, q, k, v: (B, H, L, D) with skip_reshape) -> (B, L, H*D)."""
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class ToyAttention(torch.nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.out = heads, torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, h, pe, options):
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(h + pe).chunk(3, -1))
        override = options.get("optimized_attention_override")
        attend = _attention if override is None else lambda *a, **kw: override(_attention, *a, **kw)
        return self.out(attend(q, k, v, self.heads, skip_reshape=True))


class ToyBlock(torch.nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm, self.attn = torch.nn.LayerNorm(dim), ToyAttention(dim, heads)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))

    def forward(self, h, pe=None, transformer_options={}):
        h = h + self.attn(self.norm(h), pe, transformer_options)
        return h + self.mlp(h)


class ToyDiT(torch.nn.Module):
    """Joint [text, image] attention over 2 blocks; positions computed over the whole joint sequence from its
    ids (so the row cuts them at every block), the image tokens projected out after the blocks."""

    def __init__(self, dim: int = 16, heads: int = 2, channels: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.img_in, self.txt_in = torch.nn.Linear(channels, dim), torch.nn.Linear(8, dim)
        self.time, self.pos = torch.nn.Linear(1, dim), torch.nn.Linear(1, dim)
        self.blocks = torch.nn.ModuleList(ToyBlock(dim, heads) for _ in range(2))
        self.proj_out = torch.nn.Linear(dim, channels)
        self.eval().requires_grad_(False)

    def forward(self, x, t, context=None, ids=None, mask=None, transformer_options={}):
        img, txt = self.img_in(x) + self.time(t[:, None])[:, None], self.txt_in(context)
        pe = self.pos(ids)  # (B, L_txt + L_img, dim): the whole joint sequence on every rank
        h = torch.cat([txt, img], 1)
        for block in self.blocks:
            h = block(h, pe=pe, transformer_options=transformer_options)
        return self.proj_out(h[:, txt.shape[1]:])


def toy_call(rows: int = 2, text: int = 3, image: int = 7) -> ModelCall:
    gen = torch.Generator().manual_seed(text * 10 + image)
    ids = torch.arange(text + image, dtype=torch.float32)[None, :, None].expand(rows, -1, -1) / 10
    return ModelCall(torch.randn(rows, image, 4, generator=gen), torch.rand(rows, generator=gen),
                     torch.randn(rows, text, 8, generator=gen), extras={"ids": ids, "transformer_options": {}})


def toy_forward(model, call):
    return model(call.x, call.t, context=call.context, **call.extras)


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setitem(sequence_splits.COMFY, "toy", (TOY_ROW,))  # adding the family: one row
    return comfy_sequence.runner("toy")


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("text, image", [(3, 7), (1, 2)])
def test_a_toy_family_added_as_a_row_splits_like_its_forward_in_one_process(toy_family, text, image):
    model, call = ToyDiT(), toy_call(text=text, image=image)
    group = SequenceGroup("ring", (4,), 0, "cpu")
    assert (toy_family(model, call, group) - toy_forward(model, call)).abs().max() <= 1e-5
    assert group.traffic.passes == 1  # a ring of one: no pass but the gather
    assert _hooks(model) == 0


def test_a_toy_family_refuses_what_its_row_refuses_and_is_left_as_it_was(toy_family):
    model, call = ToyDiT(), toy_call()
    call.extras["mask"] = torch.ones(2, 10)
    with pytest.raises(ValueError, match=r"does not split a Toy DiT call with a toy mask \(mask\); use cfg or batch"):
        toy_family(model, call, SequenceGroup("ring", (0,), 0, "cpu"))
    assert comfy_sequence.refusal("toy", call.extras) == "a toy mask (mask)"
    with pytest.raises(ValueError, match="use ring"):  # ulysses over 3 ranks cannot split 2 heads: before any work
        toy_family(model, toy_call(), SequenceGroup("ulysses", (0, 1, 2), 0, "cpu"))
    assert _hooks(model) == 0


RANK_SCRIPT = """
import json, sys, torch
sys.path.insert(0, sys.argv[4])
from parallel_backend.runtime import primitives
from parallel_backend.models import comfy_sequence, sequence_splits
from parallel_backend.strategies.sequence.group import SequenceGroup
from test_sequence_splits import TOY_ROW, ToyDiT, toy_call, toy_forward

torch.set_num_threads(1)
rank, world, rendezvous = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sequence_splits.COMFY["toy"] = (TOY_ROW,)
primitives.pair_in_issue_order()
primitives.join_group(rendezvous, rank, world, "cpu", timeout_s=30.0)
for text, image in ((3, 7), (1, 5)):
    model, call = ToyDiT(), toy_call(text=text, image=image)
    expected = toy_forward(model, call)
    for kind in ("ulysses", "ring"):
        group = SequenceGroup(kind, tuple(range(world)), rank, "cpu")
        out = comfy_sequence.runner("toy")(model, call, group)
        print(json.dumps({"kind": kind, "diff": (out - expected).abs().max().item(), "passes": group.traffic.passes}),
              flush=True)
primitives.leave_group()
"""


@pytest.mark.slow
def test_a_toy_family_added_as_a_row_split_over_two_processes_equals_one_process(gloo_ranks):
    world = 2
    outputs = gloo_ranks(RANK_SCRIPT, world)
    per_attention = {"ulysses": 2, "ring": world - 1}
    for results in outputs:
        assert len(results) == 4
        for result in results:  # 2 joint attentions, then one gather
            assert result["diff"] <= 1e-5 and result["passes"] == 2 * per_attention[result["kind"]] + 1, result


@pytest.mark.parametrize("host, family", [(h, f) for h, table in (("comfy", sequence_splits.COMFY),
                                                                   ("diffusers", sequence_splits.DIFFUSERS))
                                          for f in table])
def test_every_row_measures_its_streams_before_it_uses_them(host, family):
    """A stream's length comes from a cut of that stream alone; attention, joint cuts and the gather only use
    streams some such cut measures, and `short` names only those streams."""
    table = sequence_splits.COMFY if host == "comfy" else sequence_splits.DIFFUSERS
    for row in table[family]:
        cuts = [cut for site in row.cuts.values() for cut in site.values()]
        measured = {cut.stream for cut in cuts if isinstance(cut.stream, str) and not cut.per_frame}
        used = [*(s for a in row.attend for s in (*a.streams, *a.also)), *_streams(row.gather.stream),
                *(s for cut in cuts for s in _streams(cut.stream)), *row.short, *row.key_masks.values()]
        assert set(used) <= measured, (family, set(used) - measured)
        assert set(row.short.values()) <= {"pad", "refuse"} and row.heads and row.attend, family


def _streams(stream) -> tuple:
    return (stream,) if isinstance(stream, str) else stream
