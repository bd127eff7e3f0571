"""Video families whose blocks take the video tokens positionally with per-block RoPE tables and per-token
modulation: Wan 2.1 / 2.2 and LTX-Video. Only the self-attention is split; cross-attention to the text
attends locally."""

from __future__ import annotations

import torch

from .core import _call, _heads, _new_route, _refuse

def _per_token(table: torch.Tensor, length: int) -> torch.Tensor:
    """A modulation table per frame (B, F, ...) spread over the frame's tokens as Wan's `repeat_e` does."""
    frames = table.shape[1]
    if frames == length:
        return table
    repeats = length // frames + (length % frames > 0)
    return torch.repeat_interleave(table, repeats, dim=1)[:, :length]


def wan_sequence(model, call, group) -> torch.Tensor:
    """A ComfyUI Wan model's output for `call` with its video tokens split over `group`."""
    _heads(group, model.num_heads)
    route = _new_route(group)

    def cut(x: torch.Tensor) -> torch.Tensor:
        return route.shards.cut(x, group.index, 1)

    def first_block(module, args, kwargs):
        route.shards = group.shards(args[0].shape[1])
        return (cut(args[0]), *args[1:]), kwargs

    def every_block(module, args, kwargs):
        length = route.shards.length
        kwargs = dict(kwargs)
        if kwargs["freqs"].shape[1] != length:
            raise ValueError(f"sequence parallel: Wan's RoPE table covers {kwargs['freqs'].shape[1]} tokens, the "
                             f"sequence {length}")
        kwargs["freqs"] = cut(kwargs["freqs"])
        if kwargs["e"].shape[1] > 1:
            kwargs["e"] = cut(_per_token(kwargs["e"], length))
        return args, kwargs

    def head_in(module, args):
        x, e = args
        return (x, cut(_per_token(e, route.shards.length)) if e.dim() == 3 and e.shape[1] > 1 else e)

    def head_out(module, args, out):
        return group.all_gather(out, route.shards, 1)

    def hooks():
        yield model.blocks[0].register_forward_pre_hook(first_block, with_kwargs=True)
        for block in model.blocks:
            yield block.register_forward_pre_hook(every_block, with_kwargs=True)
        yield model.head.register_forward_pre_hook(head_in)
        yield model.head.register_forward_hook(head_out)

    return _call(model, call, group, [block.self_attn for block in model.blocks], route, hooks)


def ltxv_sequence(model, call, group) -> torch.Tensor:
    """A ComfyUI LTX-Video model's output for `call` with its video tokens split over `group`. Each block's
    RoPE tables (cos, sin: tokens on dim 1, or dim 2 in the split-head layout) and per-token timestep
    modulation are cut with the tokens; the output norm's result is gathered (the final modulation reads the
    whole per-token timestep). Cross-attention to the prompt attends locally."""
    if type(model).__name__ != "LTXVModel":
        raise ValueError(f"sequence parallel splits LTX-Video (LTXVModel), not {type(model).__name__}; use cfg or "
                         "batch")
    blocks = list(model.transformer_blocks)
    _heads(group, model.num_attention_heads)
    route = _new_route(group)

    def cut(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return route.shards.cut(x, group.index, dim)

    def every_block(module, args, kwargs):
        kwargs = dict(kwargs)
        if module is blocks[0]:
            route.shards = group.shards(args[0].shape[1])
            args = (cut(args[0]), *args[1:])
        _refuse(kwargs, ("self_attention_mask",), "LTX-Video")
        cos, sin, *split = kwargs["pe"]
        dim = 2 if split and split[0] else 1
        kwargs["pe"] = (cut(cos, dim), cut(sin, dim), *split)
        if kwargs["timestep"].shape[1] > 1:
            kwargs["timestep"] = cut(kwargs["timestep"])
        return args, kwargs

    def gather(module, args, out):
        return group.all_gather(out, route.shards, 1)

    def hooks():
        for block in blocks:
            yield block.register_forward_pre_hook(every_block, with_kwargs=True)
        yield model.norm_out.register_forward_hook(gather)

    return _call(model, call, group, [block.attn1 for block in blocks], route, hooks)
