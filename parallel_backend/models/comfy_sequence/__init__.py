"""ComfyUI's DiTs with their token sequence split over a sequence-parallel group (ulysses / ring), on a worker.

Every rank of the group holds the whole model and gets the same call; it runs every per-token layer on its own
contiguous shard of each token stream and has the group compute the attentions that mix tokens; the output
tokens are gathered before the model unpatchifies them, so every rank returns the whole output (see
diffusers_sequence.py for why this is exact). Nothing here imports ComfyUI: it works on the host's own model
object, through its attribute names.

Attention (core.py). ComfyUI (v0.8 and later) sends each attention through `wrap_attn`, which hands the call to
`transformer_options["optimized_attention_override"]` when present: the worker puts `attention_override`
there. It computes with the group only the attentions issued inside the family's marked modules (module
pre/post hooks arm and disarm a per-call route, models/attention_route.py); every other attention
(cross-attention to the text, whose keys every rank holds whole; a text refiner) is ComfyUI's own. A host without the
override cannot split: the nodes refuse the sequence strategies there before any work.

Per family, where the split and the gather sit (one module per kind of entry point; each runner's docstring
says more):
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

from .core import OVERRIDE, _ROUTE, _call, _new_route, attention_override, patch_refusal, refusal  # noqa: F401
from .joint_blocks import hunyuan_video_sequence, qwen_image_sequence
from .lumina import lumina_sequence
from .stream_inputs import flux_sequence, sd3_sequence
from .video import _per_token, ltxv_sequence, wan_sequence  # noqa: F401

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
