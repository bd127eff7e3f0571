"""ComfyUI's DiTs as chains of blocks that can be cut into stages and run on patches of tokens (pipefusion):
dit_stages.py's contract, on the host's own model object through its attribute names (nothing here imports
ComfyUI; the worker unpickled the model with the host's ComfyUI on its import path).

Each family's own `_forward` prepares the call and unpatchifies the output (comfy_forward.py: `inputs` stops it
where it hands its inputs on, `forward_orig_as` hands it the last stage's output; Qwen-Image unpatchifies as its
`_forward` does). In between, the blocks are the layers, ComfyUI's own modules called as its forward calls them,
with the call's transformer_options and the attention override (comfy_sequence.attention_override) through
which their token-mixing attentions (the family's row of sequence_splits.COMFY) reach pipefusion's keys and
values.
- Flux.1 / Flux.2 (comfy.ldm.flux.model.Flux): double stream then single stream blocks. A single stream block
  takes the text and image tokens joined, text first, as `forward_orig` joins them; a double stream block
  cannot take an empty text stream (its qkv view), so a patch after patch 0 gives it one zero token that joins
  no attention (the family's placeholder). A Flux.1 block's modulation (`img_mod`, `txt_mod`, `modulation`: a
  Linear on silu(vec)) may sit on another stage; Flux.2's blocks have none (its global modulations are `shared`).
- Wan 2.1 / 2.2 (comfy.ldm.wan.model.WanModel): one stream of video tokens; the cross-attention to the text (and
  CLIP image tokens) is ComfyUI's own, every stage embedding the text itself.
- Qwen-Image (comfy.ldm.qwen_image.model.QwenImageTransformer2DModel): joint blocks, text first; like Flux's double
  blocks they cannot take an empty text stream (the same placeholder); a block's `img_mod` and `txt_mod` (SiLU, then
  a Linear on the time embedding) may sit on another stage. Every stage holds the embedders (a small
  share of the weights) to run `_forward` up to the first block.
What a patched call cannot take (the sequence split's refusals: ControlNet residuals, attention masks, reference
latents on a zero timestep; model patches) the host refuses or runs on whole rows before any work
(engine/pool_engine.py); the worker checks again (`refuse`), and refuses an input `forward_orig` is given that
the layers do not take (a VACE context, Wan's reference latent) or Wan 2.2's per-frame timesteps.
"""

from __future__ import annotations

import sys

import torch

from .comfy_forward import at_first_block, forward, forward_orig_as, inputs
from .comfy_sequence import OVERRIDE, attention_override, patch_refusal, refusal
from .dit_stages import PipeFamily
from .sequence_splits import IMAGE, TEXT, VIDEO
from .stages import Activations, Context


# ---- Flux.1 / Flux.2: double stream then single stream blocks, text first in every attention ----

def _flux_refuse(call) -> None:
    what = refusal("flux", call.extras) or patch_refusal(call.extras)
    if what:
        raise ValueError(f"pipefusion does not run Flux with {what}; use cfg, batch or ulysses")


FLUX_TAKES = frozenset({"img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance", "transformer_options"})


def _flux_inputs(model, call) -> dict:
    return inputs(model, call, FLUX_TAKES, "Flux")


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


def _text_or_stand_in(ctx: Context, acts: Activations) -> tuple:
    """(text tokens, rotary table, stood in) for a joint block that cannot take an empty text stream: a patch
    without text gives it one zero token (the family's placeholder: joins no attention, its output dropped) and
    a text position's rotary row before its own."""
    txt, pe = acts.skips[0], ctx.extra["rotary"][0]
    if txt.shape[1]:
        return txt, pe, False
    return txt.new_zeros(txt.shape[0], 1, txt.shape[2]), torch.cat((ctx.extra["text_rotary"], pe), 2), True


def _flux_run(block, ctx: Context, acts: Activations) -> None:
    options = ctx.extra["options"]
    if hasattr(block, "txt_attn"):  # a double stream block
        txt, pe, stood_in = _text_or_stand_in(ctx, acts)
        acts.h, txt = block(img=acts.h, txt=txt, vec=ctx.extra["double"], pe=pe, attn_mask=None,
                            transformer_options=options)
        if not stood_in:
            acts.skips[0] = txt
        return
    txt = acts.skips[0]  # a single stream block: [text, image] joined, as forward_orig joins them
    joined = block(torch.cat((txt, acts.h), 1), vec=ctx.extra["single"], pe=ctx.extra["rotary"][0], attn_mask=None,
                   transformer_options=options)
    acts.skips[0], acts.h = joined[:, :txt.shape[1]], joined[:, txt.shape[1]:]


def _flux_finish(model, call, ctx: Context, h: torch.Tensor) -> torch.Tensor:
    out = model.final_layer(h, ctx.temb)
    with forward_orig_as(model, lambda *args, **kwargs: out):  # `_forward` unpatchifies it and crops the padding
        return forward(model, call)


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
    placeholder=("double_blocks.*",), modulation=("img_mod.lin", "txt_mod.lin", "modulation.lin"))


# ---- Wan 2.1 / 2.2 (comfy.ldm.wan.model.WanModel): video self-attention, text (and CLIP image) cross-attention ----

WAN_TAKES = frozenset({"x", "t", "context", "clip_fea", "freqs", "transformer_options"})


def _wan_inputs(model, call) -> dict:
    return inputs(model, call, WAN_TAKES, "Wan")


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
    with forward_orig_as(model, lambda *args, **kwargs: out):  # `_forward` crops the padding
        return forward(model, call)


def _wan_counts(model, call) -> tuple[int]:
    frames, rows, columns = _wan_grid(model, _wan_inputs(model, call)["x"])
    return (frames * rows * columns,)


WAN = PipeFamily(
    "comfy_dit:wan", "Wan 2.1 / 2.2", ("blocks",), (VIDEO,), (VIDEO,), first=lambda m: [m.patch_embedding],
    last=lambda m: [m.head], shared=lambda m: _present(m.time_embedding, m.time_projection, m.text_embedding,
                                                       m.img_emb, m.rope_embedder),
    tokens=_wan_tokens, context=_wan_context, run=_wan_run, finish=_wan_finish, counts=_wan_counts, rotary_dim=1,
    refuse=_wan_refuse, width=lambda m, call: (m.dim, call.x.dtype), host="comfy")



# ---- Qwen-Image (comfy.ldm.qwen_image.model.QwenImageTransformer2DModel): joint blocks, text first ----
# Its `_forward` has no forward_orig: every stage runs it up to the first block (the embedders are `shared`, a
# small share of its weights), and the last unpatchifies as `_forward` does.

QWEN_TAKES = frozenset({"hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "transformer_options"})


def _qwen_inputs(model, call) -> dict:
    return inputs(model, call, QWEN_TAKES, "Qwen-Image", at_first_block)


def _qwen_refuse(call) -> None:
    what = refusal("qwen_image", call.extras) or patch_refusal(call.extras)
    if what:
        raise ValueError(f"pipefusion does not run Qwen-Image with {what}; use cfg, batch or ulysses")


def _qwen_tokens(model, call) -> Activations:
    named = _qwen_inputs(model, call)
    return Activations(named["hidden_states"], [named["encoder_hidden_states"]])


def _qwen_context(model, call) -> Context:
    named = _qwen_inputs(model, call)
    pe = named["image_rotary_emb"]  # (B, 1, L, D/2, 2, 2) over [text, image]
    options = {**(named.get("transformer_options") or {}), OVERRIDE: attention_override}
    return Context(named["temb"], None, call.x, {"rotary": (pe,), "text_rotary": pe[:, :, :1], "options": options})


def _qwen_run(block, ctx: Context, acts: Activations) -> None:
    txt, pe, stood_in = _text_or_stand_in(ctx, acts)
    txt, acts.h = block(hidden_states=acts.h, encoder_hidden_states=txt, encoder_hidden_states_mask=None,
                        temb=ctx.temb, image_rotary_emb=pe, timestep_zero_index=None,
                        transformer_options=ctx.extra["options"])
    if not stood_in:
        acts.skips[0] = txt


def _qwen_finish(model, call, ctx: Context, h: torch.Tensor) -> torch.Tensor:
    """The output norm and projection, then back to the latent's layout: each token's 2 x 2 patch of every channel,
    the padding to the patch cropped (B, C, F, H, W)."""
    out = model.proj_out(model.norm_out(h, ctx.temb))
    tokens, _, padded = model.process_img(call.x)
    rows, channels, frames, height, width = padded
    p = model.patch_size
    out = out[:, :tokens.shape[1]].reshape(rows, frames, height // p, width // p, channels, p, p)
    out = out.permute(0, 4, 1, 2, 5, 3, 6).reshape(padded)
    return out[..., :call.x.shape[-2], :call.x.shape[-1]]


def _qwen_counts(model, call) -> tuple[int, int]:
    named = _qwen_inputs(model, call)
    return named["hidden_states"].shape[1], named["encoder_hidden_states"].shape[1]


QWEN_IMAGE = PipeFamily(
    "comfy_dit:qwen_image", "Qwen-Image", ("transformer_blocks",), (IMAGE, TEXT), (TEXT, IMAGE), first=lambda m: [],
    last=lambda m: [m.norm_out, m.proj_out],
    shared=lambda m: [m.img_in, m.txt_norm, m.txt_in, m.time_text_embed, m.pe_embedder],
    tokens=_qwen_tokens, context=_qwen_context, run=_qwen_run, finish=_qwen_finish, counts=_qwen_counts,
    rotary_dim=2, refuse=_qwen_refuse, width=lambda m, call: (m.inner_dim, call.x.dtype), host="comfy",
    placeholder=("transformer_blocks.*",), modulation=("img_mod.1", "txt_mod.1"))


FAMILIES = {family.name: family for family in (FLUX, WAN, QWEN_IMAGE)}
