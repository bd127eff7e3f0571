"""ComfyUI's DiTs with their token sequence split over a sequence-parallel group (ulysses / ring), on a worker.

Every rank of the group holds the whole model and gets the same call; it runs every per-token layer on its own
contiguous shard of each token stream and has the group compute the attentions that mix tokens; the output
tokens are gathered before the model unpatchifies them, so every rank returns the whole output (see
diffusers_sequence.py for why this is exact). Nothing here imports ComfyUI: it works on the host's own model
object, through its attribute names.

Attention. ComfyUI (v0.23+) sends each attention through `wrap_attn`, which hands the call to
`transformer_options["optimized_attention_override"]` when present: the worker puts `attention_override`
there. It computes with the group only the attentions issued inside the family's marked modules (module
pre/post hooks arm and disarm a per-call route, exactly one attention per module run); every other attention
(cross-attention to the text, whose keys every rank holds whole; a text refiner) is ComfyUI's own. A host
without the override (older ComfyUI) cannot split: `missing_override_reason` says so before any work.

Per family, where the split and the gather sit (each runner's docstring says more):
- Flux.1 / Flux.2 / Chroma: `forward_orig(img, img_ids, txt, txt_ids, ...)` gets both token streams after
  patchify and before any embedding: they and their positional ids are cut there (BOTH streams: the text
  tokens pass through the same blocks as the image tokens, and the joint attention of each double and single
  block sees [text piece, image piece] on each rank, the order `Shards` gives), and its output (image tokens,
  before unpatchify) is gathered. Marked modules: every double and single block (one joint attention each).
- SD3 / SD3.5 (MMDiT): the same at `forward_core_with_concat(x, c_mod, context)` (positions are an absolute
  table added before it); SD3.5's second, image-only self-attention is split over the image cut.
- Qwen-Image, HunyuanVideo: both streams cut at the first block's inputs, the RoPE table over the joint
  sequence cut in every block, the image tokens gathered after the last per-token layer.
- Lumina 2 / Z-Image: what `patchify_and_embed` returns (the joint [caption, image] sequence after the
  refiners, and its RoPE table) is cut; the final layer's output is gathered.
- Wan 2.1 / 2.2, LTX-Video: the video tokens are cut at the first block, each block's RoPE tables and
  per-token (Wan 2.2 5B: per-frame) modulation cut with them, and the output gathered after the head (Wan)
  or the output norm (LTX). Marked: the self-attention; the cross-attention to the text attends locally, all
  its keys on every rank.
What a family cannot split (ControlNet residuals added by position, token masks that are not key masks,
reference latents addressed by position) raises one sentence naming it and the strategies that can.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack
from contextvars import ContextVar

import torch

from .attention_route import Route, marked

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
    its transformer_options, `modules` marked and the family's `hooks()` (module hook handles) in place."""
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


def _heads(group, heads: int) -> None:
    group.check_heads(int(heads))


# --- Flux.1, Flux.2, Chroma: cut the streams where forward_orig receives them ---------------------------------

def flux_sequence(model, call, group) -> torch.Tensor:
    """A ComfyUI Flux-family model's output for `call` with both token streams split over `group`."""
    _heads(group, model.num_heads)
    route = _new_route(group)
    original = model.forward_orig
    signature = inspect.signature(original)

    def forward_orig(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        named = bound.arguments
        for name in ("control", "attn_mask", "timestep_zero_index"):
            if named.get(name) is not None:
                raise ValueError(f"sequence parallel does not split a Flux call with {name} (ControlNet, attention "
                                 "masks and timestep-zero reference latents are per token); use cfg or batch")
        img, txt = named["img"], named["txt"]
        route.shards = group.shards(txt.shape[1], img.shape[1])
        images = group.shards(img.shape[1])
        for name in ("img", "img_ids"):
            named[name] = images.cut(named[name], group.index, 1)
        texts = group.shards(txt.shape[1])
        for name in ("txt", "txt_ids"):
            named[name] = texts.cut(named[name], group.index, 1)
        return group.all_gather(original(*bound.args, **bound.kwargs), images, 1)

    model.forward_orig = forward_orig  # an instance attribute over the class's method, for this call only
    try:
        return _call(model, call, group, [*model.double_blocks, *model.single_blocks], route)
    finally:
        del model.forward_orig


# --- Wan 2.1 / 2.2: cut at the first block, gather after the head ---------------------------------------------

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


# --- joint text + image blocks (Qwen-Image, HunyuanVideo): cut at the first block, gather after the last layer -

def _refuse(named: dict, names, model: str) -> None:
    for name in names:
        if named.get(name) is not None:
            raise ValueError(f"sequence parallel does not split a {model} call with {name} (it addresses tokens by "
                             "position); use cfg or batch")


def _joint_blocks(model, call, group, blocks, streams, table, refuse, label, last=None):
    """Runs a model whose `blocks` take the text and image streams as keywords (`streams`: their names, in the
    joint order of their attention) and a positional table over that joint sequence as keyword `table` (token
    dim 2) in every block. The tokens are cut at the first block; the output of module `last` (per image token,
    before unpatchify) is gathered, or, without `last`, the joint output of the last block."""
    route = _new_route(group)

    def first_block(module, args, kwargs):
        first, second = (kwargs[name] for name in streams)
        route.shards = group.shards(first.shape[1], second.shape[1])
        route.image = group.shards(kwargs["img" if "img" in streams else streams[1]].shape[1])
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
            yield last.register_forward_hook(lambda module, args, out: group.all_gather(out, route.image, 1))
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


# --- Lumina 2 / Z-Image: cut what patchify_and_embed returns, gather after the final layer -------------------

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
        yield model.final_layer.register_forward_hook(gather)

    model.patchify_and_embed = patchify_and_embed
    try:
        return _call(model, call, group, [layer.attention for layer in model.layers], route, hooks)
    finally:
        del model.patchify_and_embed


# --- SD3 / SD3.5 (MMDiT): cut where forward_core_with_concat receives the embedded streams ----------------------

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
        _refuse(named, ("control",), "SD3")
        x, context = named["x"], named["context"]
        cuts["joint"], cuts["image"] = group.shards(context.shape[1], x.shape[1]), group.shards(x.shape[1])
        named["x"] = cuts["image"].cut(x, group.index, 1)
        named["context"] = group.shards(context.shape[1]).cut(context, group.index, 1)
        return group.all_gather(original(*bound.args, **bound.kwargs), cuts["image"], 1)

    def every_block(module, args):
        both = module.x_block.x_block_self_attn
        route.shards = (cuts["joint"], cuts["image"]) if both else cuts["joint"]

    def hooks():
        for block in blocks:
            yield block.register_forward_pre_hook(every_block)

    model.forward_core_with_concat = forward_core_with_concat
    try:
        return _call(model, call, group, blocks, route, hooks)
    finally:
        del model.forward_core_with_concat


# --- LTX-Video: cut at the first block, gather after the output norm ----------------------------------------------

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


RUNNERS = {"flux": flux_sequence, "chroma": flux_sequence, "wan": wan_sequence, "qwen_image": qwen_image_sequence,
           "hunyuan_video": hunyuan_video_sequence, "lumina": lumina_sequence, "sd3": sd3_sequence,
           "ltxv": ltxv_sequence}
HEADS = {"flux": lambda m: m.num_heads, "chroma": lambda m: m.num_heads, "wan": lambda m: m.num_heads,
         "qwen_image": lambda m: m.transformer_blocks[0].attn.heads, "hunyuan_video": lambda m: m.num_heads,
         "lumina": lambda m: m.n_heads, "sd3": lambda m: m.joint_blocks[0].x_block.attn.num_heads,
         "ltxv": lambda m: m.num_attention_heads}


def attention_heads(family: str, model) -> int | None:
    """The attention heads of a model of `family` (what ulysses must divide), None where unknown."""
    heads = HEADS.get(family)
    return None if heads is None else int(heads(model))
