"""ComfyUI's DiTs as chains of blocks that can be cut into stages and run on patches of tokens (pipefusion):
dit_stages.py's contract, on the host's own model object through its attribute names (nothing here imports
ComfyUI; the worker unpickled the model with the host's ComfyUI on its import path). Here: Wan, Qwen-Image,
SD3 / SD3.5, LTX-Video and Lumina 2 / Z-Image, and `FAMILIES`, every ComfyUI family pipefusion cuts (those built
of Flux's stream blocks, Flux.1 / Flux.2, Chroma and HunyuanVideo, are comfy_flux_stages.py's).

Each family's own forward prepares the call and unpatchifies the output (comfy_forward.py: `inputs` stops it
where it hands its inputs on, `forward_orig_as` / `method_as` hand it the last stage's output; Qwen-Image
unpatchifies as its `_forward` does). In between, the blocks are the layers, ComfyUI's own modules called as its
forward calls them, with the call's transformer_options and the attention override
(comfy_sequence.attention_override) through which their token-mixing attentions (the family's row of
sequence_splits.COMFY) reach pipefusion's keys and values.
A Flux.1 block's modulation (`img_mod`, `txt_mod`, `modulation`: a Linear on silu(vec); comfy_flux_stages.py)
may sit on another stage (strategies/pipefusion/cut.py); Flux.2's blocks have none (its global modulations are
`shared`).
- Wan 2.1 / 2.2 (comfy.ldm.wan.model.WanModel): one stream of video tokens; the cross-attention to the text (and
  CLIP image tokens) is ComfyUI's own, every stage embedding the text itself.
- Qwen-Image (comfy.ldm.qwen_image.model.QwenImageTransformer2DModel): joint blocks, text first; like Flux's double
  blocks they cannot take an empty text stream (the same placeholder); a block's `img_mod` and `txt_mod` (SiLU, then
  a Linear on the time embedding) may sit on another stage. Every stage holds the embedders (a small
  share of the weights) to run `_forward` up to the first block.
- SD3 / SD3.5 (MMDiT), LTX-Video (LTXVModel), Lumina 2 / Z-Image (NextDiT): see their blocks below.
What a patched call cannot take (the sequence split's refusals: ControlNet residuals, attention masks, reference
latents on a zero timestep; model patches) the host refuses or runs on whole rows before any work
(engine/pool_engine.py); the worker checks again (`refuse`), and refuses an input the forward hands the blocks
that the layers do not take (a VACE context, Wan's reference latent, HunyuanVideo's text mask) or Wan 2.2's
per-frame timesteps.
"""

from __future__ import annotations

import sys

import torch

from .comfy_flux_stages import CHROMA, FLUX, HUNYUAN_VIDEO, held, refuser, text_or_stand_in, with_override
from .comfy_forward import at_first_block, at_first_of, at_method, emptied, forward, forward_orig_as, input_replaced, \
    inputs, method_as, once_per_call
from .comfy_sequence import patch_refusal, refusal
from .dit_stages import PipeFamily, first_block_streams
from .sequence_splits import IMAGE, TEXT, TOKENS, VIDEO
from .stages import Activations, Context


# ---- Wan 2.1 / 2.2 (comfy.ldm.wan.model.WanModel): video self-attention, text (and CLIP image) cross-attention ----

WAN_TAKES = frozenset({"x", "t", "context", "clip_fea", "freqs", "transformer_options"})


@once_per_call
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
    options = with_override(named)
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
    last=lambda m: [m.head], shared=lambda m: held(m.time_embedding, m.time_projection, m.text_embedding,
                                                       m.img_emb, m.rope_embedder),
    tokens=_wan_tokens, context=_wan_context, run=_wan_run, finish=_wan_finish, counts=_wan_counts, rotary_dim=1,
    refuse=_wan_refuse, width=lambda m, call: (m.dim, call.x.dtype), host="comfy")



# ---- Qwen-Image (comfy.ldm.qwen_image.model.QwenImageTransformer2DModel): joint blocks, text first ----


# Its `_forward` has no forward_orig: every stage runs it up to the first block (the embedders are `shared`, a
# small share of its weights), and the last unpatchifies as `_forward` does.

QWEN_TAKES = frozenset({"hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "transformer_options"})


@once_per_call
def _qwen_inputs(model, call) -> dict:
    return inputs(model, call, QWEN_TAKES, "Qwen-Image", at_first_block)


def _qwen_context(model, call) -> Context:
    named = _qwen_inputs(model, call)
    pe = named["image_rotary_emb"]  # (B, 1, L, D/2, 2, 2) over [text, image]
    options = with_override(named)
    return Context(named["temb"], None, call.x, {"rotary": (pe,), "text_rotary": pe[:, :, :1], "options": options})


def _qwen_run(block, ctx: Context, acts: Activations) -> None:
    txt, pe, stood_in = text_or_stand_in(ctx, acts)
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


_qwen_tokens, _qwen_counts = first_block_streams(_qwen_inputs, "hidden_states", "encoder_hidden_states")


QWEN_IMAGE = PipeFamily(
    "comfy_dit:qwen_image", "Qwen-Image", ("transformer_blocks",), (IMAGE, TEXT), (TEXT, IMAGE), first=lambda m: [],
    last=lambda m: [m.norm_out, m.proj_out],
    shared=lambda m: [m.img_in, m.txt_norm, m.txt_in, m.time_text_embed, m.pe_embedder],
    tokens=_qwen_tokens, context=_qwen_context, run=_qwen_run, finish=_qwen_finish, counts=_qwen_counts,
    rotary_dim=2, refuse=refuser("qwen_image", "Qwen-Image"), width=lambda m, call: (m.inner_dim, call.x.dtype), host="comfy",
    placeholder=("transformer_blocks.*",), modulation=("img_mod.1", "txt_mod.1"))


def _only(model, cls: str, label: str) -> None:
    if type(model).__name__ != cls:
        raise ValueError(f"pipefusion cuts {label}'s {cls}, not {type(model).__name__}; use cfg or batch")


# ---- SD3 / SD3.5 (comfy.ldm.modules.diffusionmodules.mmdit.MMDiT): joint blocks, text first ----
# Every stage runs `forward` up to forward_core_with_concat (the embedders are `shared`, a small share of the
# weights). SD3.5 Medium's blocks also attend over the image tokens alone (x_block_self_attn: the row's `also`);
# the last block keeps no text (its context block is pre_only). Like Flux's double blocks, a joint block cannot
# take an empty text stream (its qkv view): the same placeholder.

SD3_TAKES = frozenset({"x", "c_mod", "context", "transformer_options"})


@once_per_call
def _sd3_inputs(model, call) -> dict:
    if getattr(model, "register_length", 0):
        raise ValueError("pipefusion does not run an MMDiT with register tokens; use cfg or batch")
    return inputs(model, call, SD3_TAKES, "SD3", at_method("forward_core_with_concat"))


def _sd3_context(model, call) -> Context:
    named = _sd3_inputs(model, call)
    return Context(named["c_mod"], None, call.x, {"options": with_override(named)})


def _sd3_run(block, ctx: Context, acts: Activations) -> None:
    txt = acts.skips[0]
    stood_in = not txt.shape[1]
    if stood_in:  # the family's placeholder: one zero token, left out of the attention, its output dropped
        txt = txt.new_zeros(txt.shape[0], 1, txt.shape[2])
    txt, acts.h = block(txt, acts.h, c=ctx.temb, use_checkpoint=False, transformer_options=ctx.extra["options"])
    if not stood_in:
        acts.skips[0] = txt  # None after the last block (pre_only): nothing follows it


def _sd3_finish(model, call, ctx: Context, h: torch.Tensor) -> torch.Tensor:
    out = model.final_layer(h, ctx.temb)
    with method_as(model, "forward_core_with_concat", lambda *args, **kwargs: out):  # unpatchified and cropped
        return forward(model, call)


_sd3_tokens, _sd3_counts = first_block_streams(_sd3_inputs, "x", "context")  # x: embedded, positions added


SD3 = PipeFamily(
    "comfy_dit:sd3", "SD3 / SD3.5", ("joint_blocks",), (IMAGE, TEXT), (TEXT, IMAGE), first=lambda m: [],
    last=lambda m: [m.final_layer],
    shared=lambda m: held(m.x_embedder, m.t_embedder, m.y_embedder, m.context_embedder, m.context_processor,
                              m.pos_embed),
    tokens=_sd3_tokens, context=_sd3_context, run=_sd3_run, finish=_sd3_finish, counts=_sd3_counts, rotary_dim=0,
    refuse=refuser("sd3", "SD3"), width=lambda m, call: (m.hidden_size, call.x.dtype), host="comfy",
    placeholder=("joint_blocks.*",))


# ---- LTX-Video (comfy.ldm.lightricks.model.LTXVModel): video self-attention, text cross-attention ----
# Every stage runs `_forward` up to _process_transformer_blocks (the patchifying projection and the embedders are
# `shared`); the last hands it its output and `_forward` finishes (the output norm, keyframes, unpatchify). The
# timestep is per token under a noise mask (image to video, keyframes): its rows follow each patch, as the rotary
# tables' do. The text's attention mask is the cross-attention's own (every patch sees the whole text); a guide's
# self-attention mask (attenuated keyframes) is refused by name.

LTXV_TAKES = frozenset({"x", "context", "attention_mask", "timestep", "pe", "transformer_options", "prompt_timestep",
                        "self_attention_mask",  # refused below when given, in words ulysses' refusal shares
                        # read by _process_output, or already used where _forward prepared the tokens
                        "orig_shape", "orig_patchified_shape", "grid_mask", "guide_attention_entries",
                        "resolved_guide_entries", "num_guide_tokens"})


@once_per_call
def _ltxv_inputs(model, call) -> dict:
    _only(model, "LTXVModel", "LTX-Video")
    options = call.extras.get("transformer_options") or {}  # _forward hands them on merged with the rest
    named = inputs(model, call, LTXV_TAKES | set(options), "LTX-Video", at_method("_process_transformer_blocks"))
    if named.get("self_attention_mask") is not None:
        raise ValueError("pipefusion does not run LTX-Video with a guide's self-attention mask (a keyframe guide of "
                         "strength other than 1, or with a pixel mask); use cfg or batch")
    return named


def _ltxv_tokens(model, call) -> Activations:
    return Activations(_ltxv_inputs(model, call)["x"])


def _ltxv_context(model, call) -> Context:
    """_forward's per-call values: the timestep's modulations (B, 1 or L, 6D), the text projected, its mask, and
    what is per token on dim -2 (`rotary`: the rotary cos and sin tables, and a per-token timestep)."""
    named = _ltxv_inputs(model, call)
    cos, sin, split = named["pe"]
    timestep = named["timestep"]
    per_token = (timestep,) if timestep.shape[1] > 1 else ()
    return Context(timestep, named["context"], call.x, {
        "rotary": (cos, sin, *per_token), "split": split, "attention_mask": named["attention_mask"],
        "prompt_timestep": named.get("prompt_timestep"), "options": with_override(named)})


def _ltxv_run(block, ctx: Context, acts: Activations) -> None:
    cos, sin, *per_token = ctx.extra["rotary"]
    more = {} if ctx.extra["prompt_timestep"] is None else {"prompt_timestep": ctx.extra["prompt_timestep"]}
    acts.h = block(acts.h, context=ctx.context, attention_mask=ctx.extra["attention_mask"],
                   timestep=per_token[0] if per_token else ctx.temb, pe=(cos, sin, ctx.extra["split"]),
                   transformer_options=ctx.extra["options"], **more)


def _ltxv_finish(model, call, ctx: Context, h: torch.Tensor) -> torch.Tensor:
    with method_as(model, "_process_transformer_blocks", lambda *args, **kwargs: h):
        return forward(model, call)


LTXV = PipeFamily(
    "comfy_dit:ltxv", "LTX-Video", ("transformer_blocks",), (VIDEO,), (VIDEO,), first=lambda m: [],
    last=lambda m: [m.norm_out, m.proj_out, m.scale_shift_table],
    shared=lambda m: held(m.patchify_proj, m.adaln_single, getattr(m, "prompt_adaln_single", None),
                              m.caption_projection),
    tokens=_ltxv_tokens, context=_ltxv_context, run=_ltxv_run, finish=_ltxv_finish,
    counts=lambda m, call: (_ltxv_inputs(m, call)["x"].shape[1],), rotary_dim=-2, refuse=refuser("ltxv", "LTX-Video"),
    width=lambda m, call: (m.inner_dim, call.x.dtype), host="comfy")


# ---- Lumina 2 / Z-Image (comfy.ldm.lumina.model.NextDiT): one joint stream, [caption, image] ----
# `_forward` stops at the first main layer: the first stage runs it whole (the caption and noise refiners are
# its own), the others with the refiners emptied (their output unused: the rotary table and the counts do not
# depend on them). The caption and image tokens are one stream, cut into patches like any other; the last stage
# hands its output to the final layer and `_forward` unpatchifies it, its layers and refiners emptied.

LUMINA_TAKES = frozenset({"x", "freqs_cis", "adaln_input", "transformer_options"})
LUMINA_REFINERS = ("context_refiner", "noise_refiner")


@once_per_call
def _lumina_inputs(model, call, refined: bool) -> dict:
    _only(model, "NextDiT", "Lumina 2")
    with emptied(model, () if refined else LUMINA_REFINERS):
        return inputs(model, call, LUMINA_TAKES, "Lumina 2", at_first_of("layers"))


def _lumina_context(model, call) -> Context:
    named = _lumina_inputs(model, call, refined=False)
    return Context(named["adaln_input"], None, call.x, {"rotary": (named["freqs_cis"],), "options": with_override(named)})


def _lumina_run(block, ctx: Context, acts: Activations) -> None:
    acts.h = block(acts.h, None, ctx.extra["rotary"][0], ctx.temb, transformer_options=ctx.extra["options"])


def _lumina_finish(model, call, ctx: Context, h: torch.Tensor) -> torch.Tensor:
    with emptied(model, (*LUMINA_REFINERS, "layers")), input_replaced(model.final_layer, h):
        return forward(model, call)


LUMINA = PipeFamily(
    "comfy_dit:lumina", "Lumina 2 / Z-Image", ("layers",), (TOKENS,), (TOKENS,),
    first=lambda m: [m.context_refiner, m.noise_refiner], last=lambda m: [m.final_layer],
    shared=lambda m: held(m.x_embedder, m.cap_embedder, m.t_embedder, m.rope_embedder,
                              getattr(m, "clip_text_pooled_proj", None), getattr(m, "time_text_embed", None),
                              getattr(m, "x_pad_token", None), getattr(m, "cap_pad_token", None)),
    tokens=lambda m, call: Activations(_lumina_inputs(m, call, refined=True)["x"]), context=_lumina_context,
    run=_lumina_run, finish=_lumina_finish,
    counts=lambda m, call: (_lumina_inputs(m, call, refined=False)["x"].shape[1],), rotary_dim=1,
    refuse=refuser("lumina", "Lumina 2"), width=lambda m, call: (m.dim, call.x.dtype), host="comfy")


FAMILIES = {family.name: family for family in (FLUX, WAN, QWEN_IMAGE, CHROMA, HUNYUAN_VIDEO, SD3, LTXV, LUMINA)}
