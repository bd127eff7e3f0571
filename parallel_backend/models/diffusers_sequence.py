"""diffusers' Flux and Wan transformers with their token sequence split over a sequence-parallel group.

Every rank of the group holds the whole model and gets the same call; it runs every per-token layer
(embeddings, norms, modulation, projections, MLPs) on its own contiguous shard of each token stream only, and
the attentions that mix tokens are computed by the group (`group.attention`: Ulysses or ring). The shards'
outputs are gathered at the end, so every rank returns the whole output.

Why this is exact. Outside attention, each token's activations depend only on that token and on per-call
values (the timestep embedding, the pooled text): a shard computes exactly the rows the whole sequence would.
Attention is exact over any split (strategies/sequence/shards.py: a query's output depends on the set of keys,
not their order). What is per token must follow the same cut as the tokens: the RoPE frequencies (Flux: of the
concatenated text + image ids, cut stream by stream as the joint sequence is), and Wan 2.2 TI2V's per-token
timestep. Uneven lengths are uneven shards (`Shards`), never padding, so nothing is masked or dropped.

Where the cut and the gather sit, without copying diffusers' forward:
- Flux: every input that is per token is cut before the call (latent tokens, text tokens, `img_ids`,
  `txt_ids`, ControlNet residuals on image tokens): the model embeds and positions only the rank's tokens, and
  its output (after `proj_out`, the narrowest point: 64 channels per token) is gathered. BOTH streams are cut:
  the text tokens go through the same double and single blocks as the image tokens (Flux.1: 512 of 4608 at
  1024 px), so replicating them would leave that share undivided on every rank and cap the speed-up.
- Wan: the latents are patchified by a convolution over the whole clip (cheap: one linear per token), so
  the cut is a forward pre-hook on the first block (`hidden_states`) and a forward hook on `rope` (its cos/sin
  tables); the gather is a forward hook on `proj_out` (before unpatchify). Only the self-attention (`attn1`)
  is split: cross-attention to the text (and to the i2v image tokens) has all its keys on every rank already,
  so its queries attend locally, with no exchange.
- Attention: diffusers' processors call `dispatch_attention_fn` from their module's globals. During the call
  (`split_attention`, which always restores) that name is replaced by a dispatcher that sends to the group
  the one attention issued inside each marked module (forward pre/post hooks), and passes every other call,
  from any module or thread, to diffusers' own. A marked module that issues no attention or two (an
  IP-adapter processor, a processor that does not use the dispatcher) raises instead of computing a wrong
  result; so does an attention mask, causal attention or dropout. A runner that knows which keys a model masks
  (Qwen-Image's text padding) keeps the mask from the model and gives it to `split_attention` as a key mask.

Qwen-Image and SD3 / SD3.5: diffusers_sequence_joint.py.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar

import torch

from .attention_route import Route, marked

DISPATCH = "dispatch_attention_fn"
IMAGE_TOKEN_LISTS = ("controlnet_block_samples", "controlnet_single_block_samples")  # Flux: (B, L_img, dim) each


def piece(group, x: torch.Tensor, dim: int) -> torch.Tensor:
    """This rank's contiguous piece of one token stream laid along `dim` of `x`."""
    return group.shards(x.shape[dim]).cut(x, group.index, dim)


def flux_sequence(model, call, group) -> torch.Tensor:
    """FluxTransformer2DModel's output for `call` (x: (B, L_img, C) packed latents, context: (B, L_txt, D)),
    computed with both token streams split over `group`; the whole (B, L_img, C_out) on every rank."""
    group.check_heads(model.config.num_attention_heads)
    extras = dict(call.extras)
    for name in ("img_ids", "txt_ids"):  # (L, 3), or the deprecated (1, L, 3)
        extras[name] = piece(group, extras[name], -2)
    for name in IMAGE_TOKEN_LISTS:
        if extras.get(name) is not None:
            extras[name] = [piece(group, residual, 1) for residual in extras[name]]
    text, image = call.context.shape[1], call.x.shape[1]
    blocks = (*model.transformer_blocks, *model.single_transformer_blocks)
    with torch.no_grad(), split_attention([block.attn for block in blocks], group, group.shards(text, image)):
        out = model(hidden_states=piece(group, call.x, 1), timestep=call.t,
                    encoder_hidden_states=piece(group, call.context, 1), return_dict=False, **extras)[0]
    return group.all_gather(out, group.shards(image), 1)


def wan_sequence(model, call, group) -> torch.Tensor:
    """WanTransformer3DModel's output for `call` (x: (B, C, F, H, W) latents; t: (B,) or per token (B, L)),
    computed with the video tokens split over `group`; the whole (B, C_out, F, H, W) on every rank."""
    group.check_heads(model.config.num_attention_heads)
    if not len(model.blocks):
        raise ValueError("a Wan transformer with no blocks has no attention to split")
    frames, height, width = call.x.shape[2:]
    p_t, p_h, p_w = model.config.patch_size
    shards = group.shards((frames // p_t) * (height // p_h) * (width // p_w))
    timestep = piece(group, call.t, 1) if call.t.dim() == 2 else call.t  # Wan 2.2 TI2V: a timestep per token

    def cut_tokens(module, args, kwargs):
        if args:
            return (shards.cut(args[0], group.index, 1), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": shards.cut(kwargs["hidden_states"], group.index, 1)}

    def cut_rope(module, args, tables):  # cos, sin: (1, L, 1, D)
        return tuple(shards.cut(table, group.index, 1) for table in tables)

    def gather(module, args, out):
        return group.all_gather(out, shards, 1)

    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(split_attention([block.attn1 for block in model.blocks], group, shards))
        stack.enter_context(model.blocks[0].register_forward_pre_hook(cut_tokens, with_kwargs=True))
        stack.enter_context(model.rope.register_forward_hook(cut_rope))
        stack.enter_context(model.proj_out.register_forward_hook(gather))
        return model(hidden_states=call.x, timestep=timestep, encoder_hidden_states=call.context,
                     return_dict=False, **call.extras)[0]


_ROUTE: ContextVar[Route | None] = ContextVar("tandem_sequence_route", default=None)
_LOCK = threading.Lock()
_INSTALLED: dict[int, list] = {}  # id(module globals) -> [globals, diffusers' dispatcher, users]


@contextmanager
def split_attention(modules, group, shards, key_mask: torch.Tensor | None = None):
    """While inside, the one attention each of `modules` dispatches is computed by `group` over `shards`
    (q, k, v: this rank's tokens in `shards`' local order), its keys masked by `key_mask` (B, L) bool over the
    whole joint sequence when given; every other attention is diffusers' own."""
    route = Route(group, shards, via=f"diffusers' {DISPATCH}", key_mask=key_mask)
    names = [_namespace(module) for module in modules]
    with ExitStack() as stack:
        stack.enter_context(marked(modules, route, _ROUTE))
        for namespace in {id(n): n for n in names}.values():
            _install(namespace)
            stack.callback(_uninstall, namespace)
        yield route


def _namespace(module) -> dict:
    """The globals in which `module`'s attention processor looks up diffusers' dispatcher."""
    processor = getattr(module, "processor", None)
    namespace = getattr(type(processor).__call__, "__globals__", {})
    if DISPATCH not in namespace:
        raise ValueError(f"sequence parallel: the attention processor {type(processor).__name__} of "
                         f"{type(module).__name__} does not call diffusers' {DISPATCH}, so its attention cannot "
                         "be split; use the model's default attention processor")
    return namespace


def _install(namespace: dict) -> None:
    with _LOCK:
        entry = _INSTALLED.setdefault(id(namespace), [namespace, namespace[DISPATCH], 0])
        if entry[2] == 0:
            namespace[DISPATCH] = _dispatcher(entry[1])
        entry[2] += 1


def _uninstall(namespace: dict) -> None:
    with _LOCK:
        entry = _INSTALLED[id(namespace)]
        entry[2] -= 1
        if entry[2] == 0:
            namespace[DISPATCH] = entry[1]
            del _INSTALLED[id(namespace)]


def _dispatcher(original):
    """diffusers' `dispatch_attention_fn` (q, k, v: (B, L, H, D)), routed to the group inside marked modules."""

    def dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, *args, **kwargs):
        route = _ROUTE.get()
        if route is None or not route.armed:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale, *args, **kwargs)
        shards = route.take()
        if attn_mask is not None or is_causal or dropout_p:
            raise ValueError("sequence parallel takes no attention mask, causal attention or dropout in "
                             f"{route.module}; run this call without a sequence split")
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        return route.group.attention(q, k, v, shards, key_mask=route.key_mask, scale=scale).transpose(1, 2)

    return dispatch
