"""diffusers' Flux, Wan, Qwen-Image and SD3 / SD3.5 transformers with their tokens split over a sequence group
(Ulysses, ring): every rank of 2 or 3 gloo processes (point-to-point in issue order, as on NCCL) builds the same
tiny seeded models, runs `run_sequence_parallel` on the same calls, and must return the whole output of
`forward` in one process; the group's traffic must show one exchange per self-attention (ring: N-1 passes), none
for Wan's cross-attention, and one gather. In one process (a group of degree 1 exchanges nothing): every case,
refusals, and that the attention dispatcher, the processors and the hooks are restored after a call, even a
failed one."""

from __future__ import annotations


import pytest
import torch

from parallel_backend.runtime.calls import ModelCall
from parallel_backend.models import diffusers_dit
from parallel_backend.models.diffusers_dit import forward, run_sequence_parallel
from parallel_backend.strategies.sequence.group import SequenceGroup

pytestmark = pytest.mark.pool



def tiny_flux(heads: int = 6):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=heads, joint_attention_dim=16,
                                  pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval().requires_grad_(False)


def tiny_wan(i2v: bool = False):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    image = dict(image_dim=16, added_kv_proj_dim=48) if i2v else {}
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=8, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                 **image).eval().requires_grad_(False)


def flux_call(rows: int, text: int, height: int, width: int, controlnet: bool = False) -> ModelCall:
    gen = torch.Generator().manual_seed(text * 100 + height * width)
    ids = torch.zeros(height, width, 3)
    ids[..., 1], ids[..., 2] = torch.arange(height)[:, None], torch.arange(width)[None, :]
    extras = {"pooled_projections": torch.randn(rows, 8, generator=gen), "img_ids": ids.reshape(-1, 3),
              "txt_ids": torch.zeros(text, 3)}
    if controlnet:
        extras["controlnet_block_samples"] = [torch.randn(rows, height * width, 48, generator=gen)]
    return ModelCall(torch.randn(rows, height * width, 8, generator=gen), torch.rand(rows, generator=gen),
                     torch.randn(rows, text, 16, generator=gen), extras=extras)


def wan_call(rows: int, frames: int, height: int, width: int, per_token_t: bool = False,
             i2v: bool = False) -> ModelCall:
    gen = torch.Generator().manual_seed(frames * 100 + height * width)
    tokens = frames * (height // 2) * (width // 2)
    t = torch.rand(rows, tokens if per_token_t else 1, generator=gen).squeeze(-1) * 1000
    extras = {"encoder_hidden_states_image": torch.randn(rows, 4, 16, generator=gen)} if i2v else {}
    text = 512 if i2v else 9  # diffusers' i2v processor takes the last 512 context tokens as the text
    return ModelCall(torch.randn(rows, 4, frames, height, width, generator=gen), t,
                     torch.randn(rows, text, 16, generator=gen), extras=extras)


def tiny_qwen_image(zero_cond_t: bool = False):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=8, num_attention_heads=6, joint_attention_dim=16,
                                       axes_dims_rope=(2, 2, 4), zero_cond_t=zero_cond_t).eval().requires_grad_(False)


def tiny_sd3(dual_attention_layers: tuple = ()):
    """SD3 (2 joint blocks, the last text-as-keys only); with dual attention layers and q/k norms, SD3.5's."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    sd35 = dict(dual_attention_layers=dual_attention_layers, qk_norm="rms_norm") if dual_attention_layers else {}
    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=6, joint_attention_dim=16, caption_projection_dim=48,
                                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16,
                                 **sd35).eval().requires_grad_(False)


def qwen_image_call(rows: int, text: int, images: list, padded: bool = False, controlnet: bool = False) -> ModelCall:
    """`images`: (height, width) in tokens of each image of a row (an edit call: the target, then the inputs)."""
    gen = torch.Generator().manual_seed(text * 100 + len(images))
    tokens = sum(h * w for h, w in images)
    extras = {"img_shapes": [[(1, h, w) for h, w in images]] * rows}
    if padded:  # row 0 padded at the end, row 1 (if any) with a hole: any pattern is a key mask
        mask = torch.ones(rows, text, dtype=torch.long)
        mask[0, -2:] = 0
        mask[1:, 1] = 0
        extras["encoder_hidden_states_mask"] = mask
    if controlnet:
        extras["controlnet_block_samples"] = [torch.randn(rows, tokens, 48, generator=gen)]
    return ModelCall(torch.randn(rows, tokens, 16, generator=gen), torch.rand(rows, generator=gen),
                     torch.randn(rows, text, 16, generator=gen), extras=extras)


def sd3_call(rows: int, text: int, height: int, width: int, controlnet: bool = False) -> ModelCall:
    gen = torch.Generator().manual_seed(text * 100 + height * width)
    extras = {"pooled_projections": torch.randn(rows, 8, generator=gen)}
    if controlnet:
        extras["block_controlnet_hidden_states"] = [torch.randn(rows, height * width, 48, generator=gen)]
    return ModelCall(torch.randn(rows, 4, height, width, generator=gen), torch.rand(rows, generator=gen) * 1000,
                     torch.randn(rows, text, 16, generator=gen), extras=extras)


def cases():
    """(name, model builder, call, self-attentions split): odd token counts; 2 text tokens leave a 3rd rank
    none."""
    return [("flux 7 text + 3x5 image, controlnet", tiny_flux, flux_call(2, 7, 3, 5, controlnet=True), 2),
            ("flux 2 text + 2x3 image", tiny_flux, flux_call(1, 2, 2, 3), 2),
            ("wan t2v 3 frames 3x5", tiny_wan, wan_call(2, 3, 6, 10), 2),
            ("wan timestep per token 1 frame 5x7", tiny_wan, wan_call(1, 1, 10, 14, per_token_t=True), 2),
            ("wan i2v 1 frame 5x7", lambda: tiny_wan(i2v=True), wan_call(1, 1, 10, 14, i2v=True), 2),
            ("qwen-image 7 padded text + 3x5 image, controlnet", tiny_qwen_image,
             qwen_image_call(2, 7, [(3, 5)], padded=True, controlnet=True), 2),
            ("qwen-image 2 text + 2x3 image", tiny_qwen_image, qwen_image_call(1, 2, [(2, 3)]), 2),
            ("qwen-image edit zero_cond_t 5 text + 2x3 and 1x3 images", lambda: tiny_qwen_image(zero_cond_t=True),
             qwen_image_call(1, 5, [(2, 3), (1, 3)]), 2),
            ("sd3 7 text + 3x5 image, controlnet", tiny_sd3, sd3_call(2, 7, 3, 5, controlnet=True), 2),
            ("sd3.5 dual attention 2 text + 3x3 image", lambda: tiny_sd3(dual_attention_layers=(0,)),
             sd3_call(1, 2, 3, 3), 3)]


RANK_SCRIPT = """
import json, sys, torch
sys.path.insert(0, sys.argv[4])
from parallel_backend.runtime import primitives
from parallel_backend.models.diffusers_dit import forward, run_sequence_parallel
from parallel_backend.strategies.sequence.group import SequenceGroup
from test_sequence_dit import cases

torch.set_num_threads(1)
rank, world, rendezvous = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
primitives.pair_in_issue_order()  # as NCCL pairs messages
primitives.join_group(rendezvous, rank, world, "cpu", timeout_s=30.0)
peers = tuple(reversed(range(world)))  # shard order other than rank order
for name, build, call, attentions in cases():
    model = build()
    expected = forward(model, call)
    for kind in ("ulysses", "ring"):
        group = SequenceGroup(kind, peers, peers.index(rank), "cpu")
        out = run_sequence_parallel(model, call, group)
        print(json.dumps({"case": name, "kind": kind, "shape_ok": out.shape == expected.shape,
                          "diff": (out - expected).abs().max().item(), "passes": group.traffic.passes,
                          "attentions": attentions}), flush=True)
primitives.leave_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_transformers_split_over_ranks_equal_one_process(gloo_ranks, world):
    outputs = gloo_ranks(RANK_SCRIPT, world)
    per_attention = {"ulysses": 2, "ring": world - 1}  # then one gather of the output
    for results in outputs:
        assert len(results) == 2 * len(cases())
        for result in results:
            assert result["shape_ok"] and result["diff"] <= 1e-5, result
            assert result["passes"] == result["attentions"] * per_attention[result["kind"]] + 1, result


def untouched(model) -> tuple:
    """What a split call must leave as it found it: diffusers' dispatchers, every attention processor, no hooks."""
    from diffusers.models.transformers import transformer_flux, transformer_qwenimage, transformer_wan

    dispatchers = [m.dispatch_attention_fn for m in (transformer_flux, transformer_qwenimage, transformer_wan)]
    processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
    return dispatchers, processors, sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("name,build,call,attentions", cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_group_of_one_equals_forward_and_leaves_the_model_as_it_was(name, build, call, attentions):
    model = build()
    before = untouched(model)
    group = SequenceGroup("ring", (5,), 0, "cpu")
    assert (run_sequence_parallel(model, call, group) - forward(model, call)).abs().max() <= 1e-5
    assert untouched(model) == before and before[2] == 0
    assert group.traffic.passes == 1 and group.traffic.bytes_sent == 0  # a ring of one: no pass but the gather


def test_an_attention_mask_is_refused_inside_the_call_and_everything_is_restored():
    model = tiny_flux()
    before, call = untouched(model), flux_call(1, 2, 2, 3)
    call.extras["joint_attention_kwargs"] = {"attention_mask": torch.ones(1, 1, 8, 8, dtype=torch.bool)}
    with pytest.raises(ValueError, match="no attention mask"):
        run_sequence_parallel(model, call, SequenceGroup("ulysses", (0,), 0, "cpu"))
    assert untouched(model) == before


def test_sd3_processors_are_restored_after_a_call_that_fails_inside_the_model():
    model = tiny_sd3(dual_attention_layers=(0,))
    before, call = untouched(model), sd3_call(1, 2, 3, 3)
    call.context = torch.randn(1, 2, 17)  # not the model's text width: its context_embedder raises
    with pytest.raises(RuntimeError):
        run_sequence_parallel(model, call, SequenceGroup("ring", (0,), 0, "cpu"))
    assert untouched(model) == before


def test_an_sd3_attention_processor_other_than_the_stock_one_is_refused_before_compute():
    from diffusers.models.attention_processor import PAGJointAttnProcessor2_0

    model = tiny_sd3()
    model.transformer_blocks[1].attn.set_processor(PAGJointAttnProcessor2_0())
    before = untouched(model)
    with pytest.raises(ValueError, match="transformer_blocks.1.attn is PAGJointAttnProcessor2_0; only diffusers' Joint"):
        run_sequence_parallel(model, sd3_call(1, 2, 3, 3), SequenceGroup("ring", (0,), 0, "cpu"))
    assert untouched(model) == before


def test_qwen_image_inputs_it_cannot_split_are_refused_before_any_exchange():
    three = SequenceGroup("ring", (0, 1, 2), 0, "cpu")  # no process group: refused before any exchange
    with pytest.raises(ValueError, match="2 image tokens cannot be split over 3 ranks"):
        run_sequence_parallel(tiny_qwen_image(), qwen_image_call(1, 5, [(1, 2)]), three)
    call = qwen_image_call(1, 5, [(2, 3)])
    call.extras["encoder_hidden_states_mask"] = torch.ones(1, 4)
    with pytest.raises(ValueError, match=r"encoder_hidden_states_mask is \(1, 4\); it must be .* \(1, 5\)"):
        run_sequence_parallel(tiny_qwen_image(), call, three)


def test_ulysses_refuses_heads_its_degree_does_not_divide_before_any_exchange():
    group = SequenceGroup("ulysses", (0, 1, 2), 0, "cpu")  # no process group: refused before any exchange
    with pytest.raises(ValueError, match="use ring"):
        run_sequence_parallel(tiny_flux(heads=4), flux_call(1, 2, 2, 3), group)
    SequenceGroup("ring", (0, 1, 2), 0, "cpu").check_heads(4)


def test_only_families_with_a_sequence_runner_are_split():
    assert {f.name for f in diffusers_dit.FAMILIES if f.sequence} == {"flux", "wan", "qwen_image", "sd3"}
    with pytest.raises(ValueError, match="no sequence-parallel adapter"):
        run_sequence_parallel(torch.nn.Linear(2, 2), None, SequenceGroup("ring", (0,), 0, "cpu"))


@pytest.mark.parametrize("kind,peers,index", [("usp", (0, 1), 0), ("ring", (0, 0), 0), ("ring", (0, 1), 2)])
def test_a_group_that_cannot_exist_is_refused(kind, peers, index):
    with pytest.raises(ValueError):
        SequenceGroup(kind, peers, index, "cpu")
