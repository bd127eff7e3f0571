"""Families whose block stack is entered through one method that receives the embedded (or patchified) token
streams: Flux.1 / Flux.2 / Chroma (`forward_orig`) and SD3 / SD3.5 (`forward_core_with_concat`). The streams
and their positional ids are cut on the way in, the image tokens gathered on the way out."""

from __future__ import annotations

import inspect

import torch

from .core import _call, _heads, _new_route, _refuse, _replaced

def flux_sequence(model, call, group) -> torch.Tensor:
    """A ComfyUI Flux-family model's output for `call` with both token streams split over `group`."""
    _heads(group, model.num_heads)
    route = _new_route(group)
    original = model.forward_orig
    signature = inspect.signature(original)

    def forward_orig(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        named = bound.arguments
        _refuse(named, ("attn_mask", "timestep_zero_index"), "Flux")  # ControlNet: refused by _call
        img, txt = named["img"], named["txt"]
        route.shards = group.shards(txt.shape[1], img.shape[1])
        images = group.shards(img.shape[1])
        for name in ("img", "img_ids"):
            named[name] = images.cut(named[name], group.index, 1)
        texts = group.shards(txt.shape[1])
        for name in ("txt", "txt_ids"):
            named[name] = texts.cut(named[name], group.index, 1)
        return group.all_gather(original(*bound.args, **bound.kwargs), images, 1)

    return _call(model, call, group, [*model.double_blocks, *model.single_blocks], route,
                 lambda: [_replaced(model, "forward_orig", forward_orig)])


def sd3_sequence(model, call, group) -> torch.Tensor:
    """A ComfyUI MMDiT (SD3, SD3.5) model's output for `call` with its text and image tokens split over `group`.
    Positions are embedded before the cut (an absolute table added to the image tokens), so nothing positional
    follows the tokens. SD3.5's blocks with a second, image-only self-attention split it over the image cut."""
    blocks = list(model.joint_blocks)
    _heads(group, blocks[0].x_block.attn.num_heads)
    if getattr(model, "register_length", 0):
        raise ValueError("sequence parallel does not split an MMDiT with register tokens; use cfg or batch")
    route = _new_route(group)
    original = model.forward_core_with_concat
    signature = inspect.signature(original)
    cuts = {}

    def forward_core_with_concat(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        named = bound.arguments
        x, context = named["x"], named["context"]
        cuts["joint"], cuts["image"] = group.shards(context.shape[1], x.shape[1]), group.shards(x.shape[1])
        named["x"] = cuts["image"].cut(x, group.index, 1)
        named["context"] = group.shards(context.shape[1]).cut(context, group.index, 1)
        return group.all_gather(original(*bound.args, **bound.kwargs), cuts["image"], 1)

    def every_block(module, args):
        both = module.x_block.x_block_self_attn
        route.shards = (cuts["joint"], cuts["image"]) if both else cuts["joint"]

    def hooks():
        yield _replaced(model, "forward_core_with_concat", forward_core_with_concat)
        for block in blocks:
            yield block.register_forward_pre_hook(every_block)

    return _call(model, call, group, blocks, route, hooks)
