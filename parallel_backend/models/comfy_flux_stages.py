"""ComfyUI's DiTs built of Flux's double and single stream blocks, as chains of blocks cut into stages and run on
patches of tokens (pipefusion): Flux.1 / Flux.2, Chroma and HunyuanVideo, and what every ComfyUI family's plan
shares (its refusals, the attention override in its options, a joint block's stand-in text token).
models/comfy_dit_stages.py holds the other ComfyUI families and the table of them all; its docstring says how a
family's own forward runs around the blocks.
- Flux.1 / Flux.2 (comfy.ldm.flux.model.Flux): double stream then single stream blocks. A single stream block
  takes the text and image tokens joined, text first, as `forward_orig` joins them; a double stream block
  cannot take an empty text stream (its qkv view), so a patch after patch 0 gives it one zero token that joins
  no attention (the family's placeholder).
- Chroma (comfy.ldm.chroma.model.Chroma): Flux's blocks, modulated not by their own linears but by slices of one
  approximator's output; every stage runs `_forward` up to the first double block, keeping that output on the way.
- HunyuanVideo 1.0 / 1.5 (comfy.ldm.hunyuan_video.model.HunyuanVideo): Flux's blocks on video and text tokens;
  forward_orig embeds them (its text refiner too), so every stage runs it up to the first double block, and the
  last unpatchifies as forward_orig does. v0.8 joins [video, text] where later versions join [text, video]: its
  double blocks get their rotary rows in their order and an attention override that hands pipefusion's
  attention the text first, so the keys and values held are in one order on every version.
"""

from __future__ import annotations

import sys

import torch

from .comfy_forward import at_first_of, forward, forward_orig_as, inputs, once_per_call, recorded
from .comfy_sequence import OVERRIDE, attention_override, patch_refusal, refusal
from .dit_stages import PipeFamily, first_block_streams
from .sequence_hooks import present
from .sequence_splits import IMAGE, TEXT, VIDEO
from .stages import Activations, Context


# ---- what every ComfyUI family's plan uses ----

def refuser(family: str, label: str):
    """The family's `refuse`: what its row of sequence_splits.COMFY refuses, and a model patch."""

    def refuse(call) -> None:
        what = refusal(family, call.extras) or patch_refusal(call.extras)
        if what:
            raise ValueError(f"pipefusion does not run {label} with {what}; use cfg, batch or ulysses")

    return refuse


def with_override(named: dict) -> dict:
    """The call's transformer_options with the attention override that routes the token-mixing attentions."""
    return {**(named.get("transformer_options") or {}), OVERRIDE: attention_override}


def held(*items) -> list:
    """The modules and tensors among `items` (a family's optional parts are None, or absent, where not built)."""
    return [m for m in items if isinstance(m, (torch.nn.Module, torch.Tensor))]


def text_or_stand_in(ctx: Context, acts: Activations) -> tuple:
    """(text tokens, rotary table, stood in) for a joint block that cannot take an empty text stream: a patch
    without text gives it one zero token (the family's placeholder: joins no attention, its output dropped) and
    a text position's rotary row before its own."""
    txt, pe = acts.skips[0], ctx.extra["rotary"][0]
    if txt.shape[1]:
        return txt, pe, False
    return txt.new_zeros(txt.shape[0], 1, txt.shape[2]), torch.cat((ctx.extra["text_rotary"], pe), 2), True


# ---- Flux.1 / Flux.2: double stream then single stream blocks, text first in every attention ----

FLUX_TAKES = frozenset({"img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance", "transformer_options"})


@once_per_call
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
    options = with_override(named)
    return Context(vec, None, call.x, {"rotary": (pe,), "text_rotary": pe[:, :, :1], "double": double,
                                       "single": single, "options": options})


def _stream_block(block, ctx: Context, acts: Activations, vec) -> None:
    """One of Flux's double or single stream blocks (Chroma's, HunyuanVideo's too) on the activations, modulated
    by `vec`; the rotary table in ctx is the [text, image] sequence's."""
    options = ctx.extra["options"]
    if hasattr(block, "txt_attn"):  # a double stream block
        txt, pe, stood_in = text_or_stand_in(ctx, acts)
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


FLUX = PipeFamily(
    "comfy_dit:flux", "Flux.1 / Flux.2", ("double_blocks", "single_blocks"), (IMAGE, TEXT), (TEXT, IMAGE),
    first=lambda m: held(m.img_in, m.txt_in, getattr(m, "txt_norm", None)), last=lambda m: [m.final_layer],
    shared=lambda m: held(m.time_in, m.vector_in, m.guidance_in, m.pe_embedder,
                              *(getattr(m, name, None) for name in ("double_stream_modulation_img",
                                                                    "double_stream_modulation_txt",
                                                                    "single_stream_modulation"))),
    tokens=_flux_tokens, context=_flux_context, run=_flux_run, finish=_flux_finish, counts=_flux_counts,
    rotary_dim=2, refuse=refuser("flux", "Flux"), width=lambda m, call: (m.hidden_size, call.x.dtype), host="comfy",
    placeholder=("double_blocks.*",), modulation=("img_mod.lin", "txt_mod.lin", "modulation.lin"))


# ---- Chroma and HunyuanVideo: Flux's double and single stream blocks; their forward_orig embeds the tokens and
# prepares the modulations (Chroma's approximator, HunyuanVideo's text refiner), so every stage runs it up to the
# first double block (the embedders are `shared`, a small share of the weights), as for Qwen-Image ----

STREAM_TAKES = frozenset({"img", "txt", "vec", "pe", "transformer_options"})  # what a first double block takes
FIRST_DOUBLE = at_first_of("double_blocks")


def _stream_context(named: dict, call, temb, **extra) -> Context:
    """The context of a first double block's inputs: the [text, image] rotary table, the options every block gets."""
    pe = named["pe"]  # (B, 1, L, D/2, 2, 2)
    options = with_override(named)
    return Context(temb, None, call.x, {"rotary": (pe,), "text_rotary": pe[:, :, :1], "options": options, **extra})


@once_per_call
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
    first=lambda m: [], last=lambda m: held(getattr(m, "final_layer", None)),
    shared=lambda m: [m.img_in, m.txt_in, m.distilled_guidance_layer, m.pe_embedder],
    tokens=_chroma_tokens, context=_chroma_context, run=_chroma_run, finish=_flux_finish, counts=_chroma_counts,
    rotary_dim=2, refuse=refuser("chroma", "Chroma"), width=lambda m, call: (m.hidden_size, call.x.dtype), host="comfy",
    placeholder=("double_blocks.*",))


@once_per_call
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
    shared=lambda m: held(*(getattr(m, name, None) for name in (
        "img_in", "time_in", "time_r_in", "vector_in", "guidance_in", "txt_in", "byt5_in", "vision_in",
        "cond_type_embedding", "pe_embedder"))),
    tokens=_hunyuan_tokens, context=_hunyuan_context, run=_flux_run, finish=_hunyuan_finish, counts=_hunyuan_counts,
    rotary_dim=2, refuse=_hunyuan_refuse, width=lambda m, call: (m.hidden_size, call.x.dtype), host="comfy",
    placeholder=("double_blocks.*",))
