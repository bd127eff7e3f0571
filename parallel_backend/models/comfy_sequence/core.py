"""What every ComfyUI family's sequence split shares: the attention override ComfyUI's attention hands its calls
to, the call itself (the override in transformer_options, the marked modules, the family's hooks), and the
refusals of what cannot be split by tokens."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from contextvars import ContextVar

import torch

from ..attention_route import Route, marked

OVERRIDE = "optimized_attention_override"


_ROUTE: ContextVar[Route | None] = ContextVar("tandem_comfy_sequence_route", default=None)


def _new_route(group) -> Route:
    return Route(group, via="ComfyUI's optimized_attention")


def attention_override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                       skip_output_reshape=False, *args, **kwargs):
    """ComfyUI's `optimized_attention_override` signature: `func` is ComfyUI's attention, the rest its inputs
    (q, k, v: (B, L, H*D) or (B, L, H, D), or (B, H, L, D) with skip_reshape)."""
    route = _ROUTE.get()
    if route is None or not route.armed:
        return func(q, k, v, heads, mask, attn_precision, skip_reshape, skip_output_reshape, *args, **kwargs)
    shards = route.take()
    key_mask = None if mask is None else _key_mask(mask, shards, route.module)
    if not skip_reshape:
        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    local = shards.sizes[route.group.index]
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


def _call(model, call, group, modules, route: Route, hooks=lambda: ()):
    """The model's forward for `call`, as comfy_dit.forward calls it, with the group's attention override in
    its transformer_options, `modules` marked and the family's `hooks()` in place (module hook handles, `_replaced` methods)."""
    extras = dict(call.extras)
    if extras.get("control") is not None:
        raise ValueError("sequence parallel does not split a call with ControlNet residuals (they are added to "
                         "tokens by position); use cfg or batch with ControlNet")
    extras["transformer_options"] = {**(extras.get("transformer_options") or {}), OVERRIDE: attention_override}
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(marked(modules, route, _ROUTE))
        for handle in hooks():
            stack.enter_context(handle)
        return model(call.x, call.t, context=call.context, **extras)


@contextmanager
def _replaced(model, name: str, replacement):
    """`model.<name>` is `replacement` inside (an instance attribute over the class's method), the class's after."""
    setattr(model, name, replacement)
    try:
        yield
    finally:
        delattr(model, name)


def _heads(group, heads: int) -> None:
    group.check_heads(int(heads))


def _refuse(named: dict, names, model: str) -> None:
    for name in names:
        if named.get(name) is not None:
            raise ValueError(f"sequence parallel does not split a {model} call with {name} (it addresses tokens by "
                             "position); use cfg or batch")


# Inputs a family's split refuses (the runners raise on them on the workers): checked on the host first, so
# `auto` keeps such a call on cfg / batch and a named sequence strategy refuses it before any work.
_CONTROL = ("control", "ControlNet residuals (added to tokens by position)")
REFUSED_INPUTS = {
    "flux": (_CONTROL, ("attention_mask", "an attention mask")),
    "chroma": (_CONTROL, ("attention_mask", "an attention mask")),
    "qwen_image": (_CONTROL, ("attention_mask", "a text attention mask")),
    "hunyuan_video": (_CONTROL, ("ref_latent", "a reference latent"), ("guiding_frame_index", "a guiding frame")),
    "lumina": (_CONTROL, ("ref_latents", "reference latents")),
}


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
    """Why a call of `family` with these inputs cannot be split by tokens at all (one phrase), or None."""
    for name, what in REFUSED_INPUTS.get(family, (_CONTROL,)):
        value = extras.get(name)
        if value is not None and not (isinstance(value, (list, tuple)) and not value):
            return f"{what} ({name})"
    if extras.get("ref_latents") and extras.get("ref_latents_method") == "index_timestep_zero":
        return "reference latents on a zero timestep (ref_latents_method index_timestep_zero)"
    return None
