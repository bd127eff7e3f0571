"""The ComfyUI sequence split's host-independent parts (models/comfy_sequence/, sequence_hooks.py): the attention
override that ComfyUI's attention hands its calls to, ComfyUI's masks as key masks, per-frame modulation spread
over tokens.
Pure: a sequence group of degree 1 exchanges nothing. The split itself, on every family, against the stock
KSampler: tests/comfy/test_sequence_families.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parallel_backend.models import attention_route, comfy_dit, comfy_sequence, sequence_runner, sequence_splits
from parallel_backend.models.sequence_hooks import per_token
from parallel_backend.strategies.sequence.group import SequenceGroup

pytestmark = pytest.mark.pool

B, H, L, D = 2, 4, 6, 8


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g) for _ in range(3)]


def _comfy_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                     skip_output_reshape=False, **kwargs):
    """ComfyUI's attention contract, for the override to fall back to: (B, L, H*D) unless told otherwise."""
    if not skip_reshape:
        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out if skip_output_reshape else out.transpose(1, 2).flatten(2)


@pytest.fixture
def route():
    group = SequenceGroup("ring", (0,), 0, "cpu")
    route = attention_route.Route(group, group.shards(2, L - 2))
    token = attention_route.ROUTE.set(route)
    yield route
    attention_route.ROUTE.reset(token)


def test_unarmed_attention_is_comfys_own(route):
    q, k, v = _qkv()
    calls = []

    def func(*args, **kwargs):
        calls.append(kwargs)
        return _comfy_attention(*args, **kwargs)

    out = comfy_sequence.attention_override(func, q, k, v, H, skip_reshape=True, transformer_options={})
    assert len(calls) == 1 and torch.equal(out, _comfy_attention(q, k, v, H, skip_reshape=True))


@pytest.mark.parametrize("layout", ["heads first", "flat", "tokens, heads"])
def test_armed_attention_goes_to_the_group_in_every_input_layout(route, layout):
    q, k, v = _qkv(1)
    expected = _comfy_attention(q, k, v, H, skip_reshape=True)
    if layout == "heads first":
        inputs, kw = (q, k, v), {"skip_reshape": True}
    elif layout == "flat":
        inputs, kw = tuple(t.transpose(1, 2).flatten(2) for t in (q, k, v)), {}
    else:  # SD3's MMDiT: (B, L, H, D) without skip_reshape
        inputs, kw = tuple(t.transpose(1, 2) for t in (q, k, v)), {}
    route.arm("block 0")
    out = comfy_sequence.attention_override(_unreachable, *inputs, H, transformer_options={}, **kw)
    route.disarm()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _unreachable(*args, **kwargs):
    raise AssertionError("an armed attention must not run ComfyUI's own")


def test_a_split_module_must_issue_exactly_the_attentions_it_splits(route):
    route.arm("block 0")
    with pytest.raises(RuntimeError, match="issued 0 attentions"):
        route.disarm()
    q, k, v = _qkv()
    route.arm("block 1")
    comfy_sequence.attention_override(_unreachable, q, k, v, H, skip_reshape=True)
    with pytest.raises(RuntimeError, match="more attentions than the 1"):
        comfy_sequence.attention_override(_unreachable, q, k, v, H, skip_reshape=True)


def test_a_padding_mask_over_the_whole_sequence_is_a_key_mask(route):
    q, k, v = _qkv(2)
    additive = torch.zeros(1, 1, L)
    additive[..., 1] = -torch.finfo(torch.float32).max  # HunyuanVideo's text padding, additive
    expected = _comfy_attention(q, k, v, H, mask=additive, skip_reshape=True)
    route.arm("block 0")
    out = comfy_sequence.attention_override(_unreachable, q, k, v, H, mask=additive, skip_reshape=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask, says", [(torch.zeros(1, L, L), "only a mask over the"),
                                        (torch.full((1, 1, L), 0.5), "an attention bias, not a mask")])
def test_masks_that_are_not_key_masks_are_refused(route, mask, says):
    q, k, v = _qkv()
    route.arm("block 0")
    with pytest.raises(ValueError, match=says):
        comfy_sequence.attention_override(_unreachable, q, k, v, H, mask=mask, skip_reshape=True)


def test_a_shard_of_other_length_than_the_cut_is_refused(route):
    q, k, v = (t[:, :, :3] for t in _qkv())
    route.arm("block 0")
    with pytest.raises(RuntimeError, match="attends 3 queries to 3 keys, but this rank holds 6"):
        comfy_sequence.attention_override(_unreachable, q, k, v, H, skip_reshape=True)


@pytest.mark.parametrize("frames, tokens", [(3, 12), (3, 10), (1, 5), (5, 5)])
def test_per_frame_modulation_spreads_over_tokens_as_wan_does(frames, tokens):
    table = torch.arange(frames, dtype=torch.float32).reshape(1, frames, 1).expand(2, frames, 4)
    spread = per_token(table, tokens)
    assert spread.shape == (2, tokens, 4)
    # Wan's repeat_e: repeats = tokens // frames (one more when it does not divide), then cut to the tokens
    repeats = tokens // frames + (tokens % frames > 0)
    assert torch.equal(spread, torch.repeat_interleave(table, repeats, dim=1)[:, :tokens])


def test_every_comfy_dit_family_has_a_sequence_split_row():
    for family in comfy_dit.FAMILIES:
        if family.adapter == comfy_dit.ADAPTER:
            assert sequence_runner(family.wire).args == (sequence_splits.COMFY[family.name],), family.name
    assert sequence_runner("comfy_unet") is None


def test_controlnet_residuals_are_refused_before_the_model_runs():
    from parallel_backend.runtime.calls import ModelCall

    call = ModelCall(torch.zeros(1, 4, 2, 2), torch.zeros(1), None, extras={"control": {"input": [torch.zeros(1)]}})
    group = SequenceGroup("ring", (0,), 0, "cpu")
    model = torch.nn.Module()
    model.num_heads, model.blocks, model.head = 2, torch.nn.ModuleList([torch.nn.Module()]), torch.nn.Identity()
    model.blocks[0].self_attn = torch.nn.Identity()  # a Wan by its row's paths, never called
    model.forward = _unreachable
    with pytest.raises(ValueError, match="ControlNet residuals .* use cfg or batch"):
        comfy_sequence.runner("wan")(model, call, group)


@pytest.mark.parametrize("family, extras, says", [
    ("wan", {"control": {"input": []}}, "ControlNet residuals"),
    ("flux", {"attention_mask": torch.ones(1, 4)}, "an attention mask"),
    ("qwen_image", {"ref_latents": [torch.zeros(1)], "ref_latents_method": "index_timestep_zero"}, "zero timestep"),
    ("hunyuan_video", {"guiding_frame_index": 0}, "a guiding frame"),
    ("lumina", {"ref_latents": [torch.zeros(1)]}, "reference latents"),
])
def test_inputs_a_split_cannot_take_are_named_before_the_call(family, extras, says):
    assert says in comfy_sequence.refusal(family, extras)
    assert comfy_sequence.refusal(family, {"control": None, "ref_latents": [], "guidance": torch.ones(1)}) is None


def test_a_named_sequence_strategy_refuses_such_a_call_before_any_weights_travel():
    from parallel_backend.runtime.calls import ModelCall
    from parallel_backend.engine.config import ParallelConfig
    from parallel_backend.hosts.executor import ParallelExecutor
    from parallel_backend.runtime.pool import WorkerPool

    call = ModelCall(torch.zeros(1, 4, 2, 2), torch.zeros(1), torch.zeros(1, 3, 8),
                     extras={"control": {"input": [torch.zeros(1)]}})
    with WorkerPool("cpu:2") as pool:
        with pytest.raises(ValueError, match="cannot split this call by tokens: it has ControlNet residuals .*use "
                                             "cfg, batch or auto"):
            ParallelExecutor(pool, ParallelConfig("cpu:2", "ring")).run(torch.nn.Identity(), "comfy_dit:flux", call)
        assert pool.stats.model_loads == 0  # nothing was shipped
