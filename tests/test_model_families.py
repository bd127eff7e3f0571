"""Model families as data (models/comfy_dit.py, models/diffusers_dit.py) and how a call is cut for them: pure
functions, no processes. The families' outputs against the stock host are tested in tests/comfy and
tests/test_diffusers_transformers.py."""

from __future__ import annotations

import uuid

import pytest
import torch

from parallel_backend import strategies
from parallel_backend.runtime.calls import ModelCall
from parallel_backend.models import comfy_dit, diffusers_dit, forward_for_family
from parallel_backend.strategies.base import join_rows


def _module(*paths: str) -> torch.nn.Module:
    """A module holding (empty) submodules at each dotted path."""
    root = torch.nn.Module()
    for path in paths:
        node = root
        for name in path.split("."):
            if not hasattr(node, name):
                node.add_module(name, torch.nn.Module())
            node = getattr(node, name)
    return root


@pytest.mark.parametrize("family", comfy_dit.FAMILIES, ids=lambda f: f.name)
def test_each_comfy_family_is_recognised_by_its_own_parts(family):
    assert comfy_dit.recognise(_module(*family.parts)) is family


def test_more_specific_families_win_over_flux_whose_blocks_they_share():
    flux = comfy_dit.FAMILIES[[f.name for f in comfy_dit.FAMILIES].index("flux")]
    chroma = _module(*flux.parts, "distilled_guidance_layer")
    hunyuan = _module(*flux.parts, "txt_in.individual_token_refiner")
    assert comfy_dit.recognise(chroma).name == "chroma"
    assert comfy_dit.recognise(hunyuan).name == "hunyuan_video"
    assert comfy_dit.recognise(_module(*flux.parts)).name == "flux"


def test_an_unknown_model_gets_one_sentence_naming_its_class():
    class PixelDiT(torch.nn.Module):
        pass

    reason = comfy_dit.unsupported_reason(PixelDiT())
    assert "PixelDiT" in reason and "Flux" in reason and "\n" not in reason
    assert comfy_dit.unsupported_reason(_module(*comfy_dit.FAMILIES[0].parts)) is None


def test_the_unet_family_keeps_its_adapter_name_and_dits_name_their_family():
    wires = {f.name: f.wire for f in comfy_dit.FAMILIES}
    assert wires["unet"] == "comfy_unet" and wires["flux"] == "comfy_dit:flux"
    for wire in wires.values():
        assert callable(forward_for_family(wire))
    with pytest.raises(ValueError, match="unknown model family"):
        forward_for_family("onnx:flux")


def test_positional_arguments_are_named_from_the_models_own_signature():
    class Flux:  # Flux's forward signature in ComfyUI v0.24
        def _forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                     transformer_options={}, **kwargs):
            pass

    named = comfy_dit.name_arguments(Flux()._forward, ("X", "T", "C", "Y", "G", None, None, {"a": 1}),
                                     {"attention_mask": "M"})
    assert list(named) == ["x", "timestep", "context", "y", "guidance", "ref_latents", "control",
                           "transformer_options", "attention_mask"]
    assert named["guidance"] == "G" and named["attention_mask"] == "M"

    def wan(x, t, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs):
        pass

    assert comfy_dit.name_arguments(wan, ("X", "T", "C", "F"), {})["clip_fea"] == "F"


def test_transformer_options_travel_without_the_hosts_machinery():
    options = {"cond_or_uncond": [1, 0], "uuids": [uuid.uuid4()], "sigmas": torch.ones(2),
               "rope_options": {"scale_x": 1.0}, "wrappers": {"diffusion_model": {"tandem": [print]}},
               "callbacks": {}, "tandem": {"base_model": print}, "patches": {"attn1_patch": [print]},
               "patches_replace": {"dit": {}}, "easycache": object()}
    portable = comfy_dit.portable_options(options)
    # the patches go (the engine carries them: test_carry.py); the wrappers and what only they read stay
    assert set(portable) == {"cond_or_uncond", "uuids", "sigmas", "rope_options", "patches", "patches_replace"}


@pytest.mark.parametrize("options, named", [
    ({"patches_replace": {"dit": {("double_block", 1): print}}}, "a model patch (patches_replace: dit)"),
    ({"patches": {"post_input": [], "attn1_patch": [print]}}, "a model patch (patches: attn1_patch)"),
    ({"optimized_attention_override": print}, "a model patch (optimized_attention_override)"),
])
def test_a_model_patch_keeps_a_call_to_whole_rows(options, named):
    call = ModelCall(torch.ones(1, 4, 8, 8), torch.ones(1), None, {"transformer_options": options})
    assert comfy_dit.sequence_whole_rows("comfy_dit:flux", call) == named
    assert comfy_dit.sequence_refusal("comfy_dit:flux", call) is None  # whole rows, not a refusal
    unpatched = ModelCall(torch.ones(1), torch.ones(1), None, {"transformer_options": {"patches": {}}})
    assert comfy_dit.sequence_whole_rows("comfy_dit:flux", unpatched) is None


def test_shared_inputs_stay_whole_and_row_lists_are_cut_with_the_rows():
    rows = 3
    call = ModelCall(torch.arange(rows * 2.0).reshape(rows, 2), torch.ones(rows), torch.zeros(rows, 4, 2),
                     {"img_ids": torch.zeros(rows, 3), "pooled": torch.arange(rows * 1.0).reshape(rows, 1),
                      "img_shapes": [(1, 2, 2), (1, 4, 4), (1, 8, 8)], "ref": [torch.ones(rows, 2)], "n": 7},
                     shared=frozenset({"img_ids"}), row_lists=frozenset({"img_shapes"}))
    share = call.select(range(1, 3))
    assert share.x.shape[0] == 2 and share.extras["img_ids"].shape == (rows, 3)  # positional ids: whole
    assert share.extras["pooled"].flatten().tolist() == [1.0, 2.0]
    assert share.extras["img_shapes"] == [(1, 4, 4), (1, 8, 8)]
    assert share.extras["ref"][0].shape == (2, 2) and share.extras["n"] == 7


def test_list_outputs_join_element_by_element():
    outs = [[torch.zeros(1, 2), torch.zeros(1, 3)], [torch.ones(1, 2), torch.ones(1, 3)]]
    joined = join_rows(outs, torch.zeros(2, 2, dtype=torch.float64))
    assert isinstance(joined, list) and joined[0].shape == (2, 2) and joined[1].shape == (2, 3)
    assert joined[1].dtype == torch.float64 and joined[1][1].tolist() == [1.0, 1.0, 1.0]


def test_asyncdiff_refuses_transformers_in_one_sentence_and_row_strategies_take_any_family():
    with pytest.raises(ValueError, match="cuts UNets only, and this model is a flux transformer: use cfg"):
        strategies.get("asyncdiff").check_family("comfy_dit:flux")
    strategies.get("asyncdiff").check_family("comfy_unet")
    for name in ("cfg", "batch"):
        strategies.get(name).check_family("diffusers_dit:wan")


def test_diffusers_transformers_are_recognised_by_class():
    from diffusers import FluxTransformer2DModel

    class MyFlux(FluxTransformer2DModel):
        pass

    tiny = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=4,
                num_attention_heads=1, joint_attention_dim=8, pooled_projection_dim=4, axes_dims_rope=(2, 2, 0))
    assert diffusers_dit.recognise(MyFlux(**tiny)).wire == "diffusers_dit:flux"
    assert diffusers_dit.recognise(torch.nn.Linear(1, 1)) is None
