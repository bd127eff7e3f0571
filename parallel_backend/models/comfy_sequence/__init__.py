"""ComfyUI's DiTs with their token sequence split over a sequence-parallel group (ulysses / ring), on a worker.

Every rank of the group holds the whole model and gets the same call; where each family's token streams are
cut, which modules issue the attentions the group computes and where the output is gathered is the family's
row of sequence_splits.py (`COMFY`: Flux.1 / Flux.2, Chroma, SD3 / SD3.5, Qwen-Image, HunyuanVideo 1.0 / 1.5,
Lumina 2 / Z-Image, Wan 2.1 / 2.2, LTX-Video), applied by sequence_hooks.py. Nothing here imports ComfyUI: it
works on the host's own model object, through its attribute names.

Attention (core.py). ComfyUI (v0.8 and later) sends each attention through `wrap_attn`, which hands the call to
`transformer_options["optimized_attention_override"]` when present: the worker puts `attention_override`
there. It computes with the group only the attentions issued inside the row's marked modules (module
pre/post hooks arm and disarm the call's route, models/attention_route.py); every other attention
(cross-attention to the text, whose keys every rank holds whole; a text refiner) is ComfyUI's own. A host
without the override cannot split: the nodes refuse the sequence strategies there before any work.
What a family cannot split (ControlNet residuals added by position, token masks that are not key masks,
reference latents addressed by position) is in its row's `refuse`: one sentence naming it and the
strategies that can.
"""

from __future__ import annotations

from .core import OVERRIDE, attention_heads, attention_override, patch_refusal, refusal, runner  # noqa: F401
