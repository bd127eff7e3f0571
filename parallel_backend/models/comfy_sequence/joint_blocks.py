"""Families whose blocks take the text and image streams as keywords with a positional table over the joint
sequence: Qwen-Image and HunyuanVideo (1.0, 1.5). Cut at the first block, the table in every block."""

from __future__ import annotations

import torch

from .core import _call, _heads, _new_route, _refuse

def _joint_blocks(model, call, group, blocks, streams, table, refuse, label, last=None):
    """Runs a model whose `blocks` take the text and image streams as keywords (`streams`: their names, in the
    joint order of their attention) and a positional table over that joint sequence as keyword `table` (token
    dim 2) in every block. The tokens are cut at the first block; the output of module `last` (per image token,
    before unpatchify) is gathered, or, without `last`, the joint output of the last block."""
    route = _new_route(group)
    image = {}  # the cut of the image stream alone, what `last` gathers

    def first_block(module, args, kwargs):
        first, second = (kwargs[name] for name in streams)
        route.shards = group.shards(first.shape[1], second.shape[1])
        image["cut"] = group.shards(kwargs["img" if "img" in streams else streams[1]].shape[1])
        kwargs = dict(kwargs)
        for name, tokens in zip(streams, (first, second)):
            kwargs[name] = group.shards(tokens.shape[1]).cut(tokens, group.index, 1)
        return args, kwargs

    def every_block(module, args, kwargs):
        _refuse(kwargs, refuse, label)
        kwargs = dict(kwargs)
        if kwargs.get(table) is not None:
            kwargs[table] = route.shards.cut(kwargs[table], group.index, 2)
        return args, kwargs

    def hooks():
        yield blocks[0].register_forward_pre_hook(first_block, with_kwargs=True)
        for block in blocks:
            yield block.register_forward_pre_hook(every_block, with_kwargs=True)
        if last is not None:
            yield last.register_forward_hook(lambda module, args, out: group.all_gather(out, image["cut"], 1))
        else:
            yield blocks[-1].register_forward_hook(lambda module, args, out: group.all_gather(out, route.shards, 1))

    return _call(model, call, group, blocks, route, hooks)


def qwen_image_sequence(model, call, group) -> torch.Tensor:
    """A ComfyUI Qwen-Image model's output for `call` with its text and image tokens split over `group`."""
    blocks = list(model.transformer_blocks)
    _heads(group, blocks[0].attn.heads)
    return _joint_blocks(model, call, group, blocks, ("encoder_hidden_states", "hidden_states"),
                         "image_rotary_emb", ("encoder_hidden_states_mask", "timestep_zero_index"), "Qwen-Image",
                         last=model.proj_out)


def hunyuan_video_sequence(model, call, group) -> torch.Tensor:
    """A ComfyUI HunyuanVideo (1.0 / 1.5) model's output for `call` with its text and video tokens split over
    `group`; the text refiner runs before the cut, on every rank, on the whole prompt. Older ComfyUI (v0.8)
    joins the streams as [video, text] (`flipped_img_txt`) and slices the video tokens out of the last block's
    output by their whole count: there the joint output of the last block is gathered; later versions join
    [text, video] and slice by the (local) text count, so the final layer's output is."""
    _heads(group, model.num_heads)
    if call.extras.get("ref_latent") is not None:
        raise ValueError("sequence parallel does not split a HunyuanVideo call with ref_latent; use cfg or batch")
    blocks = [*model.double_blocks, *model.single_blocks]
    refuse = ("modulation_dims", "modulation_dims_img", "modulation_dims_txt")
    if getattr(model.double_blocks[0], "flipped_img_txt", False):
        return _joint_blocks(model, call, group, blocks, ("img", "txt"), "pe", refuse, "HunyuanVideo")
    return _joint_blocks(model, call, group, blocks, ("txt", "img"), "pe", refuse, "HunyuanVideo",
                         last=model.final_layer)
