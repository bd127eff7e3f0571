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
  no attention (the family's placeholder).
- Wan 2.1 / 2.2 (comfy.ldm.wan.model.WanModel): one stream of video tokens; the cross-attention to the text (and
  CLIP image tokens) is ComfyUI's own, every stage embedding the text itself.
- Qwen-Image (comfy.ldm.qwen_image.model.QwenImageTransformer2DModel): joint blocks, text first; like Flux's double
  blocks they cannot take an empty text stream (the same placeholder). Every stage holds the embedders (a small
  share of the weights) to run `_forward` up to the first block.
- Chroma (comfy.ldm.chroma.model.Chroma): Flux's blocks, modulated not by their own linears but by slices of one
  approximator's output; every stage runs `_forward` up to the first double block, keeping that output on the way.
- HunyuanVideo 1.0 / 1.5 (comfy.ldm.hunyuan_video.model.HunyuanVideo): Flux's blocks on video and text tokens;
  forward_orig embeds them (its text refiner too), so every stage runs it up to the first double block, and the
  last unpatchifies as forward_orig does. v0.8 joins [video, text] where later versions join [text, video]: its
  double blocks get their rotary rows in their order and an attention override that hands pipefusion's
  attention the text first, so the keys and values held are in one order on every version.
What a patched call cannot take (the sequence split's refusals: ControlNet residuals, attention masks, reference
latents on a zero timestep; model patches) the host refuses or runs on whole rows before any work
(engine/pool_engine.py); the worker checks again (`refuse`), and refuses an input `forward_orig` is given that
the layers do not take (a VACE context, Wan's reference latent, HunyuanVideo's text mask) or Wan 2.2's per-frame
timesteps.
"""

from __future__ import annotations

import sys
from functools import partial

import torch

from .comfy_forward import at_first_block, forward, forward_orig_as, inputs, recorded
from .comfy_sequence import OVERRIDE, attention_override, patch_refusal, refusal
from .dit_stages import PipeFamily, first_block_streams
from .sequence_hooks import present
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


def _stream_block(block, ctx: Context, acts: Activations, vec) -> None:
    """One of Flux's double or single stream blocks (Chroma's, HunyuanVideo's too) on the activations, modulated
    by `vec`; the rotary table in ctx is the [text, image] sequence's."""
    options = ctx.extra["options"]
    if hasattr(block, "txt_attn"):  # a double stream block
        txt, pe, stood_in = _text_or_stand_in(ctx, acts)
        if getattr(block, "flipped_img_txt", False):  # v0.8's HunyuanVideo joins [image, text]
            pe, options = _image_first(pe, options, txt.shape[1])
        acts.h, txt = block(img=acts.h, txt=txt, vec=vec, pe=pe, attn_mask=None, transformer_options=options)
        if not stood_in:
            acts.skips[0] = txt
        return
    txt = acts.skips[0]  # a single stream block: [text, image] joined, as forward_orig joins them
    joined = block(torch.cat((txt, acts.h), 1), vec=vec, pe=ctx.extra["rotary"][0], attn_mask=None,
                   transformer_options=options)
    acts.skips[0], acts.h = joined[:, :txt.shape[1]], joined[:, txt.shape[1]:]


def _image_first(pe: torch.Tensor, options: dict, text: int) -> tuple:
    """For a double block that joins [image, text] (`text` tokens last): its rotary rows in that order, and an
    attention override that hands pipefusion's attention the text first, so the keys and values it holds (and a
    stand-in token's place, leading) are in the same [text, image] order on every ComfyUI version."""
    inner = options[OVERRIDE]

    def text_first(func, q, k, v, *args, **kwargs):  # q, k, v: (B, H, L, D), as Flux's attention hands them on
        out = inner(func, *(t.roll(text, 2) for t in (q, k, v)), *args, **kwargs)  # (B, L, H * D)
        return out.roll(-text, 1)

    return pe.roll(-text, 2), {**options, OVERRIDE: text_first}


def _flux_run(block, ctx: Context, acts: Activations) -> None:
    _stream_block(block, ctx, acts, ctx.extra["double" if hasattr(block, "txt_attn") else "single"])


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
    placeholder=("double_blocks.*",))


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


_qwen_tokens, _qwen_counts = first_block_streams(_qwen_inputs, "hidden_states", "encoder_hidden_states")


QWEN_IMAGE = PipeFamily(
    "comfy_dit:qwen_image", "Qwen-Image", ("transformer_blocks",), (IMAGE, TEXT), (TEXT, IMAGE), first=lambda m: [],
    last=lambda m: [m.norm_out, m.proj_out],
    shared=lambda m: [m.img_in, m.txt_norm, m.txt_in, m.time_text_embed, m.pe_embedder],
    tokens=_qwen_tokens, context=_qwen_context, run=_qwen_run, finish=_qwen_finish, counts=_qwen_counts,
    rotary_dim=2, refuse=_qwen_refuse, width=lambda m, call: (m.inner_dim, call.x.dtype), host="comfy",
    placeholder=("transformer_blocks.*",))


# ---- Chroma and HunyuanVideo: Flux's double and single stream blocks; their forward_orig embeds the tokens and
# prepares the modulations (Chroma's approximator, HunyuanVideo's text refiner), so every stage runs it up to the
# first double block (the embedders are `shared`, a small share of the weights), as for Qwen-Image ----

STREAM_TAKES = frozenset({"img", "txt", "vec", "pe", "transformer_options"})  # what a first double block takes
FIRST_DOUBLE = partial(at_first_block, blocks="double_blocks")


def _stream_context(named: dict, call, temb, **extra) -> Context:
    """The context of a first double block's inputs: the [text, image] rotary table, the options every block gets."""
    pe = named["pe"]  # (B, 1, L, D/2, 2, 2)
    options = {**(named.get("transformer_options") or {}), OVERRIDE: attention_override}
    return Context(temb, None, call.x, {"rotary": (pe,), "text_rotary": pe[:, :, :1], "options": options, **extra})


def _chroma_inputs(model, call) -> dict:
    """What Chroma's first double block is handed, and the approximator's modulation vectors (`mods`)."""
    if hasattr(model, "nerf_blocks"):
        raise ValueError("pipefusion does not run Chroma Radiance (its pixel decoder follows the blocks); use cfg, "
                         "batch or ulysses")
    if model.skip_mmdit or model.skip_dit:
        raise ValueError("pipefusion does not run Chroma with blocks skipped (skip_mmdit, skip_dit); use cfg, batch "
                         "or ulysses")
    with recorded(model.distilled_guidance_layer) as mods:
        named = inputs(model, call, STREAM_TAKES, "Chroma", FIRST_DOUBLE)
    return {**named, "mods": mods[0]}


_chroma_tokens, _chroma_counts = first_block_streams(_chroma_inputs, "img", "txt")


def _chroma_refuse(call) -> None:
    what = refusal("chroma", call.extras) or patch_refusal(call.extras)
    if what:
        raise ValueError(f"pipefusion does not run Chroma with {what}; use cfg, batch or ulysses")


def _chroma_context(model, call) -> Context:
    """Each block's slice of the approximator's modulations (the model's own get_modulations), keyed by the block;
    the final layer's as the context's temb."""
    named = _chroma_inputs(model, call)
    mods, slice_of = named["mods"], model.get_modulations
    per_block = {block: (slice_of(mods, "double_img", idx=i), slice_of(mods, "double_txt", idx=i))
                 for i, block in enumerate(model.double_blocks)}
    per_block.update({block: slice_of(mods, "single", idx=i) for i, block in enumerate(model.single_blocks)})
    return _stream_context(named, call, slice_of(mods, "final"), modulations=per_block)


def _chroma_run(block, ctx: Context, acts: Activations) -> None:
    _stream_block(block, ctx, acts, ctx.extra["modulations"][block])


CHROMA = PipeFamily(
    "comfy_dit:chroma", "Chroma", ("double_blocks", "single_blocks"), (IMAGE, TEXT), (TEXT, IMAGE),
    first=lambda m: [], last=lambda m: _present(getattr(m, "final_layer", None)),
    shared=lambda m: [m.img_in, m.txt_in, m.distilled_guidance_layer, m.pe_embedder],
    tokens=_chroma_tokens, context=_chroma_context, run=_chroma_run, finish=_flux_finish, counts=_chroma_counts,
    rotary_dim=2, refuse=_chroma_refuse, width=lambda m, call: (m.hidden_size, call.x.dtype), host="comfy",
    placeholder=("double_blocks.*",))


def _hunyuan_inputs(model, call) -> dict:
    """What HunyuanVideo's first double block is handed: the embedded video and refined text tokens (CLIP vision
    and ByT5 tokens joined to the text where given), the time, guidance and pooled-text vector, the rotary table."""
    return inputs(model, call, STREAM_TAKES, "HunyuanVideo", FIRST_DOUBLE)


_hunyuan_tokens, _hunyuan_counts = first_block_streams(_hunyuan_inputs, "img", "txt")


def _hunyuan_refuse(call) -> None:
    what = refusal("hunyuan_video", call.extras) or patch_refusal(call.extras)
    if what is None and present(call.extras.get("attention_mask")):
        what = "a text attention mask (attention_mask)"
    if what:
        raise ValueError(f"pipefusion does not run HunyuanVideo with {what}; use cfg, batch or ulysses")


def _hunyuan_context(model, call) -> Context:
    named = _hunyuan_inputs(model, call)
    if getattr(model.double_blocks[0], "flipped_img_txt", False):  # v0.8 joins [video, text]: text first here
        named = {**named, "pe": named["pe"].roll(named["txt"].shape[1], 2)}
    vec = named["vec"]
    return _stream_context(named, call, vec, double=vec, single=vec)


def _hunyuan_finish(model, call, ctx: Context, h: torch.Tensor) -> torch.Tensor:
    """The final layer, then back to the latent's layout as forward_orig unpatchifies: each token's patch of
    every output channel (B, C, F, H, W; HunyuanImage's 2-D patches: B, C, H, W)."""
    out, patch = model.final_layer(h, ctx.temb), list(model.patch_size)
    sizes, n = call.x.shape[-len(patch):], len(patch)
    out = out.reshape(out.shape[0], *(s // p for s, p in zip(sizes, patch)), model.out_channels, *patch)
    order = [0, n + 1, *(d for i in range(n) for d in (1 + i, n + 2 + i))]  # (B, C, grid_0, patch_0, grid_1, ...)
    return out.permute(order).reshape(out.shape[0], model.out_channels, *sizes)


HUNYUAN_VIDEO = PipeFamily(
    "comfy_dit:hunyuan_video", "HunyuanVideo", ("double_blocks", "single_blocks"), (VIDEO, TEXT), (TEXT, VIDEO),
    first=lambda m: [], last=lambda m: [m.final_layer],
    shared=lambda m: _present(*(getattr(m, name, None) for name in (
        "img_in", "time_in", "time_r_in", "vector_in", "guidance_in", "txt_in", "byt5_in", "vision_in",
        "cond_type_embedding", "pe_embedder"))),
    tokens=_hunyuan_tokens, context=_hunyuan_context, run=_flux_run, finish=_hunyuan_finish, counts=_hunyuan_counts,
    rotary_dim=2, refuse=_hunyuan_refuse, width=lambda m, call: (m.hidden_size, call.x.dtype), host="comfy",
    placeholder=("double_blocks.*",))


FAMILIES = {family.name: family for family in (FLUX, WAN, QWEN_IMAGE, CHROMA, HUNYUAN_VIDEO)}
