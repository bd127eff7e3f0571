"""The ComfyUI host of models/sequence_hooks.py: the call (the attention override in transformer_options), the
attention override ComfyUI's attention hands its calls to, and the refusals of what cannot be split by tokens."""

from __future__ import annotations

from functools import partial

import torch

from ..attention_route import current
from ..sequence_hooks import applied, attribute, chosen, present
from ..sequence_splits import COMFY

OVERRIDE = "optimized_attention_override"
VIA = "ComfyUI's optimized_attention"


def runner(family: str):
    """`run(model, call, group)` for a ComfyUI family with a row in sequence_splits.COMFY, else None."""
    rows = COMFY.get(family)
    return None if rows is None else partial(run_split, rows)


def run_split(rows, model, call, group) -> torch.Tensor:
    """The model's output for `call` as comfy_dit.forward calls it, its tokens split over `group` as the family's
    row says (the group's attention override in its transformer_options); the whole output on every rank."""
    extras = dict(call.extras)
    extras["transformer_options"] = {**(extras.get("transformer_options") or {}), OVERRIDE: attention_override}
    with applied(chosen(rows, model), model, group, via=VIA) as split:
        named = split.inputs({"x": call.x, "t": call.t, "context": call.context, **extras})
        return split.output(model(named.pop("x"), named.pop("t"), **named))


def attention_heads(family: str, model) -> int | None:
    """The attention heads of a model of `family` (what ulysses must divide), None where unknown."""
    rows = COMFY.get(family)
    return None if rows is None else int(attribute(model, chosen(rows, model).heads))


def attention_override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                       skip_output_reshape=False, *args, **kwargs):
    """ComfyUI's `optimized_attention_override` signature: `func` is ComfyUI's attention, the rest its inputs
    (q, k, v: (B, L, H*D) or (B, L, H, D), or (B, H, L, D) with skip_reshape)."""
    route = current()
    if route is None or not route.armed:
        return func(q, k, v, heads, mask, attn_precision, skip_reshape, skip_output_reshape, *args, **kwargs)
    shards = route.take()
    key_mask = None if mask is None else _key_mask(mask, shards, route.module)
    if not skip_reshape:
        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    local = shards.sizes[route.group.index] if hasattr(shards, "sizes") else q.shape[2]  # pipefusion: its patch
    if q.shape[2] != local or k.shape[2] != local:
        raise RuntimeError(f"sequence parallel: {route.module} attends {q.shape[2]} queries to {k.shape[2]} keys, "
                           f"but this rank holds {local} tokens of the split sequence")
    out = route.group.attention(q, k, v, shards, key_mask=key_mask)
    return out if skip_output_reshape else out.transpose(1, 2).flatten(2)


def _key_mask(mask: torch.Tensor, shards, module: str) -> torch.Tensor:
    """ComfyUI's attention mask, when it masks keys of the whole joint sequence alike for every query (as
    HunyuanVideo's text padding does: (B or 1, 1, L) additive, 0 or very negative), as the group's key mask
    (B or 1, L) bool; anything else raises."""
    length = shards.length
    if mask.shape[-1] != length or any(size != 1 for size in mask.shape[1:-1]):
        raise ValueError(f"sequence parallel: {module} got an attention mask of shape {tuple(mask.shape)}; "
                         f"only a mask over the {length} keys of the whole sequence can be split: run this call "
                         "without a sequence split")
    flat = mask.reshape(mask.shape[0], length)
    if flat.dtype == torch.bool:
        return flat
    keep = flat > torch.finfo(flat.dtype).min / 2
    if bool((flat[keep] != 0).any()):
        raise ValueError(f"sequence parallel: {module} got an attention bias, not a mask; run this call "
                         "without a sequence split")
    return keep


PATCHES = ("patches", "patches_replace", OVERRIDE)  # transformer_options entries that change the model's maths


def patch_refusal(extras: dict) -> str | None:
    """Why a call with these inputs runs on whole rows although its family can split its tokens (one phrase), or
    None: a model patch (a replaced block or attention, an attention override). What it computes on a rank's
    share of the tokens is not known to equal its share of what it computes on all of them."""
    options = extras.get("transformer_options") or {}
    patched = []
    for key in PATCHES:
        value = options.get(key)
        if isinstance(value, dict) and any(value.values()):
            patched.append(f"{key}: {', '.join(str(name) for name, entries in value.items() if entries)}")
        elif value is not None and not isinstance(value, dict):
            patched.append(key)
    return f"a model patch ({'; '.join(patched)})" if patched else None


def refusal(family: str, extras: dict) -> str | None:
    """Why a call of `family` with these inputs cannot be split by tokens at all (one phrase), or None: checked
    on the host first (the workers refuse them too), so `auto` keeps such a call on cfg / batch and a named
    sequence strategy refuses it before any work."""
    for refused in COMFY[family][0].refuse if family in COMFY else ():
        if not refused.at and present(extras.get(refused.name)):
            return f"{refused.what} ({refused.name})"
    if extras.get("ref_latents") and extras.get("ref_latents_method") == "index_timestep_zero":
        return "reference latents on a zero timestep (ref_latents_method index_timestep_zero)"
    return None
