"""Lumina 2 / Z-Image (NextDiT): the joint [caption, image] sequence `patchify_and_embed` returns is cut."""

from __future__ import annotations

import torch

from .core import _call, _heads, _new_route, _replaced

def lumina_sequence(model, call, group) -> torch.Tensor:
    """A ComfyUI NextDiT (Lumina 2, Z-Image) model's output for `call` with its joint [caption, image] sequence
    split over `group`. The caption and noise refiners (2 + 2 layers against Z-Image's 30) run inside
    patchify_and_embed, before the cut, on every rank."""
    _heads(group, model.n_heads)
    route = _new_route(group)
    original = model.patchify_and_embed

    def patchify_and_embed(*args, **kwargs):  # v0.8: 5 values; later a timestep_zero_index too
        tokens, mask, sizes, caption, table, *rest = original(*args, **kwargs)
        if mask is not None or any(value is not None for value in rest):
            raise ValueError("sequence parallel does not split a Lumina / Z-Image call with reference latents or "
                             "a token mask; use cfg or batch")
        route.shards = group.shards(tokens.shape[1])
        return (route.shards.cut(tokens, group.index, 1), mask, sizes, caption,
                route.shards.cut(table, group.index, 1), *rest)

    def gather(module, args, out):
        return group.all_gather(out, route.shards, 1)

    def hooks():
        yield _replaced(model, "patchify_and_embed", patchify_and_embed)
        yield model.final_layer.register_forward_hook(gather)

    return _call(model, call, group, [layer.attention for layer in model.layers], route, hooks)
