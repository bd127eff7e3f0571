"""ComfyUI's DiTs as chains of blocks that can be cut into stages and run on patches of tokens (pipefusion):
dit_stages.py's contract, on the host's own model object through its attribute names (nothing here imports
ComfyUI; the worker unpickled the model with the host's ComfyUI on its import path).

Each family's model has a `_forward` that prepares the call (padding to the patch, the tokens' positions or rotary
table, Flux's reference latents, the rope options) and hands the result to `forward_orig`; `forward_orig`
stands in for the call's duration as sequence_hooks.py's method sites do: `_inputs` takes what it was handed,
`finish` hands back the last stage's output for `_forward` to unpatchify and crop. In between, the blocks are
the layers, ComfyUI's own modules called as `forward_orig` calls them, with the call's transformer_options and
the attention override (comfy_sequence.attention_override) through which their token-mixing attentions (the
family's row of sequence_splits.COMFY) reach pipefusion's keys and values.
- Flux.1 / Flux.2 (comfy.ldm.flux.model.Flux): double stream then single stream blocks. A single stream block
  takes the text and image tokens joined, text first, as `forward_orig` joins them; a double stream block
  cannot take an empty text stream (its qkv view), so a patch after patch 0 gives it one zero token that joins
  no attention (the family's placeholder).
- Wan 2.1 / 2.2 (comfy.ldm.wan.model.WanModel): one stream of video tokens; the cross-attention to the text (and
  CLIP image tokens) is ComfyUI's own, every stage embedding the text itself.
What a patched call cannot take (the sequence split's refusals: ControlNet residuals, attention masks, reference
latents on a zero timestep; model patches) the host refuses or runs on whole rows before any work
(engine/pool_engine.py); the worker checks again (`refuse`), and refuses an input `forward_orig` is given that
the layers do not take (a VACE context, Wan's reference latent) or Wan 2.2's per-frame timesteps.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch

from .comfy_dit import name_arguments
from .comfy_sequence import OVERRIDE, attention_override, patch_refusal, refusal
from .dit_stages import PipeFamily
from .sequence_splits import IMAGE, TEXT, VIDEO
from .stages import Activations, Context


class _Reached(Exception):
    """Raised by the stand-in for forward_orig: the inputs `_forward` prepared, by name."""

    def __init__(self, named: dict):
        super().__init__("forward_orig reached")
        self.named = named


@contextmanager
def _forward_orig_as(model, function):
    """`model.forward_orig` is `function` while inside (an instance attribute over the method)."""
    model.forward_orig = function
    try:
        yield
    finally:
        del model.forward_orig


def _forward(model, call):
    """The model's `_forward` on `call`'s inputs, as comfy_dit.forward calls the model (without its wrappers)."""
    extras = dict(call.extras)
    extras.setdefault("transformer_options", {})
    return model._forward(call.x, call.t, context=call.context, **extras)


def _inputs(model, call, takes: frozenset, label: str) -> dict:
    """What `_forward` hands `forward_orig` for `call`, by name (Flux: img, img_ids, txt, txt_ids, timesteps, y,
    ...). An input outside `takes` that is given (a ControlNet's residuals, a VACE context, a reference latent
    of Wan's, what a later ComfyUI adds) raises: the family's layers would compute without it."""
    original = model.forward_orig

    def reached(*args, **kwargs):
        raise _Reached(name_arguments(original, args, kwargs))

    with _forward_orig_as(model, reached):
        try:
            _forward(model, call)
        except _Reached as stop:
            named = stop.named
            extra = [name for name, value in named.items() if name not in takes and _given(value)]
            if extra:
                raise ValueError(f"pipefusion does not run {label} with {', '.join(sorted(extra))} (given to "
                                 f"{type(model).__name__}.forward_orig); use cfg, batch or ulysses") from None
            return named
    raise RuntimeError(f"{type(model).__name__}._forward returned without calling forward_orig")


def _given(value) -> bool:
    return value is not None and not (isinstance(value, (list, tuple, dict)) and not value)


# ---- Flux.1 / Flux.2: double stream then single stream blocks, text first in every attention ----

def _flux_refuse(call) -> None:
    what = refusal("flux", call.extras) or patch_refusal(call.extras)
    if what:
        raise ValueError(f"pipefusion does not run Flux with {what}; use cfg, batch or ulysses")


FLUX_TAKES = frozenset({"img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance", "transformer_options"})


def _flux_inputs(model, call) -> dict:
    return _inputs(model, call, FLUX_TAKES, "Flux")


def _flux_tokens(model, call) -> Activations:
    named = _flux_inputs(model, call)
    txt = named["txt"] if getattr(model, "txt_norm", None) is None else model.txt_norm(named["txt"])
    return Activations(model.img_in(named["img"]), [model.txt_in(txt)])


def _flux_context(model, call) -> Context:
    """forward_orig's per-call values: the timestep, guidance and pooled-text embedding (Flux.2: its global
    modulations), the rotary table of the whole [text, image] sequence, the options every block gets."""
    named = _flux_inputs(model, call)
    embed = sys.modules[type(model).__module__].timestep_embedding  # what forward_orig embeds with
    dtype, params = named["img"].dtype, model.params
    vec = model.time_in(embed(named["timesteps"], 256).to(dtype))
    if params.guidance_embed and named.get("guidance") is not None:
        vec = vec + model.guidance_in(embed(named["guidance"], 256).to(dtype))
    if model.vector_in is not None:
        y = named.get("y")
        if y is None:
            y = torch.zeros((call.rows, params.vec_in_dim), device=vec.device, dtype=dtype)
        vec = vec + model.vector_in(y[:, :params.vec_in_dim])
    pe = model.pe_embedder(torch.cat((named["txt_ids"], named["img_ids"]), dim=1))  # (B, 1, L, D/2, 2, 2)
    double = single = vec
    if params.global_modulation:
        double = (model.double_stream_modulation_img(vec), model.double_stream_modulation_txt(vec))
        single, _ = model.single_stream_modulation(vec)
    options = {**(named.get("transformer_options") or {}), OVERRIDE: attention_override}
    return Context(vec, None, call.x, {"rotary": (pe,), "text_rotary": pe[:, :, :1], "double": double,
                                       "single": single, "options": options})


def _flux_run(block, ctx: Context, acts: Activations) -> None:
    pe, options, txt = ctx.extra["rotary"][0], ctx.extra["options"], acts.skips[0]
    if hasattr(block, "txt_attn"):  # a double stream block
        if txt.shape[1]:
            acts.h, acts.skips[0] = block(img=acts.h, txt=txt, vec=ctx.extra["double"], pe=pe, attn_mask=None,
                                          transformer_options=options)
            return
        stand_in = txt.new_zeros(txt.shape[0], 1, txt.shape[2])  # the placeholder: joins no attention, dropped
        acts.h, _ = block(img=acts.h, txt=stand_in, vec=ctx.extra["double"],
                          pe=torch.cat((ctx.extra["text_rotary"], pe), 2), attn_mask=None, transformer_options=options)
        return
    joined = block(torch.cat((txt, acts.h), 1), vec=ctx.extra["single"], pe=pe, attn_mask=None,
                   transformer_options=options)
    acts.skips[0], acts.h = joined[:, :txt.shape[1]], joined[:, txt.shape[1]:]


def _flux_finish(model, call, ctx: Context, h: torch.Tensor) -> torch.Tensor:
    out = model.final_layer(h, ctx.temb)
    with _forward_orig_as(model, lambda *args, **kwargs: out):  # `_forward` unpatchifies it and crops the padding
        return _forward(model, call)


def _flux_counts(model, call) -> tuple[int, int]:
    named = _flux_inputs(model, call)
    return named["img"].shape[1], named["txt"].shape[1]


def _present(*modules) -> list:
    return [m for m in modules if m is not None]


FLUX = PipeFamily(
    "comfy_dit:flux", "Flux.1 / Flux.2", ("double_blocks", "single_blocks"), (IMAGE, TEXT), (TEXT, IMAGE),
    first=lambda m: _present(m.img_in, m.txt_in, getattr(m, "txt_norm", None)), last=lambda m: [m.final_layer],
    shared=lambda m: _present(m.time_in, m.vector_in, m.guidance_in, m.pe_embedder,
                              *(getattr(m, name, None) for name in ("double_stream_modulation_img",
                                                                    "double_stream_modulation_txt",
                                                                    "single_stream_modulation"))),
    tokens=_flux_tokens, context=_flux_context, run=_flux_run, finish=_flux_finish, counts=_flux_counts,
    rotary_dim=2, refuse=_flux_refuse, width=lambda m, call: (m.hidden_size, call.x.dtype), host="comfy",
    placeholder=("double_blocks.*",))



# ---- Wan 2.1 / 2.2 (comfy.ldm.wan.model.WanModel): video self-attention, text (and CLIP image) cross-attention ----

WAN_TAKES = frozenset({"x", "t", "context", "clip_fea", "freqs", "transformer_options"})


def _wan_inputs(model, call) -> dict:
    return _inputs(model, call, WAN_TAKES, "Wan")


def _wan_refuse(call) -> None:
    if call.t.ndim > 1 and call.t[0].numel() > 1:
        raise ValueError("pipefusion does not run Wan 2.2's per-frame timesteps; use cfg, batch or ulysses")
    what = refusal("wan", call.extras) or patch_refusal(call.extras)
    if what:
        raise ValueError(f"pipefusion does not run Wan with {what}; use cfg, batch or ulysses")


def _wan_tokens(model, call) -> Activations:
    x = _wan_inputs(model, call)["x"]  # padded to the patch by _forward
    return Activations(model.patch_embedding(x.float()).to(x.dtype).flatten(2).transpose(1, 2))


def _wan_context(model, call) -> Context:
    """forward_orig's per-call values: the time embedding and its six modulations, the text (CLIP image tokens
    first, for image-to-video) embedded for the cross-attention, the rotary table of the whole clip."""
    named = _wan_inputs(model, call)
    x, t = named["x"], named["t"]
    embed = sys.modules[type(model).__module__].sinusoidal_embedding_1d
    e = model.time_embedding(embed(model.freq_dim, t.flatten()).to(dtype=x.dtype))
    e = e.reshape(t.shape[0], -1, e.shape[-1])
    text, image_tokens = model.text_embedding(named["context"]), None
    if named.get("clip_fea") is not None:
        if model.img_emb is not None:
            text = torch.concat([model.img_emb(named["clip_fea"]), text], dim=1)
        image_tokens = named["clip_fea"].shape[-2]
    options = {**(named.get("transformer_options") or {}), OVERRIDE: attention_override}
    return Context(e, text, call.x, {"rotary": (named["freqs"],), "modulation": model.time_projection(e).unflatten(
        2, (6, model.dim)), "image_tokens": image_tokens, "options": options})  # freqs: (1, L, 1, D/2, 2, 2)


def _wan_run(block, ctx: Context, acts: Activations) -> None:
    acts.h = block(acts.h, e=ctx.extra["modulation"], freqs=ctx.extra["rotary"][0], context=ctx.context,
                   context_img_len=ctx.extra["image_tokens"], transformer_options=ctx.extra["options"])


def _wan_grid(model, x: torch.Tensor) -> tuple[int, int, int]:
    """The clip's tokens along frames, rows and columns (x: the padded latent, (B, C, F, H, W))."""
    return tuple(size // patch for size, patch in zip(x.shape[2:], model.patch_size))


def _wan_finish(model, call, ctx: Context, h: torch.Tensor) -> torch.Tensor:
    out = model.unpatchify(model.head(h, ctx.temb), _wan_grid(model, _wan_inputs(model, call)["x"]))
    with _forward_orig_as(model, lambda *args, **kwargs: out):  # `_forward` crops the padding
        return _forward(model, call)


def _wan_counts(model, call) -> tuple[int]:
    frames, rows, columns = _wan_grid(model, _wan_inputs(model, call)["x"])
    return (frames * rows * columns,)


WAN = PipeFamily(
    "comfy_dit:wan", "Wan 2.1 / 2.2", ("blocks",), (VIDEO,), (VIDEO,), first=lambda m: [m.patch_embedding],
    last=lambda m: [m.head], shared=lambda m: _present(m.time_embedding, m.time_projection, m.text_embedding,
                                                       m.img_emb, m.rope_embedder),
    tokens=_wan_tokens, context=_wan_context, run=_wan_run, finish=_wan_finish, counts=_wan_counts, rotary_dim=1,
    refuse=_wan_refuse, width=lambda m, call: (m.dim, call.x.dtype), host="comfy")


FAMILIES = {family.name: family for family in (FLUX, WAN)}
