"""A UNet's self-attentions for `patch` (models/unet_patch.py): this band's queries attend to every band's keys and
values, which the band group hands over (its own band's fresh, the others' fresh or from the previous call).

Which attentions: the first attention of each transformer block (`attn1`) where it attends to its own input:
diffusers' `Attention` called with no encoder_hidden_states, ComfyUI's `CrossAttention` called with no context.
The second attention (to the text) and any attn1 given a context (ComfyUI's disable_self_attn, diffusers'
only_cross_attention) see no other band and run as written. The tokens of a transformer block are its rows of
pixels in order (both hosts flatten (B, C, H, W) to (B, H*W, C)), so a band's tokens are its rows.

The attention to each band's block of keys is computed alone with its log-sum-exp and the blocks merged
(strategies/sequence/attention.py): exact for fresh blocks, and no (B, H, L, D) copy of the whole keys is made.
"""

from __future__ import annotations

import torch
from torch import nn

from ..strategies.sequence.attention import block_attention, merge

# diffusers processors whose computation `_diffusers_forward` reproduces (the plain ones); any other (IP-Adapter's,
# a custom one) would be bypassed, so the call is refused naming it.
PLAIN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "AttnProcessorNPU")


def self_attentions(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every transformer block's attn1 in `module`. Raises ValueError in one sentence, before
    any work, for one this split cannot reproduce."""
    found = []
    for name, block in module.named_modules():
        attn = getattr(block, "attn1", None)
        if not isinstance(attn, nn.Module) or not type(block).__name__.endswith("TransformerBlock"):
            continue
        if _is_diffusers(attn):
            _check_diffusers(f"{name}.attn1", attn)
        elif not all(hasattr(attn, part) for part in ("to_q", "to_k", "to_v", "to_out", "heads")):
            raise ValueError(f"patch does not know the attention {name}.attn1 ({type(attn).__name__}): use cfg or "
                             "batch for this model")
        found.append((f"{name}.attn1", attn))
    return found


def _is_diffusers(attn) -> bool:
    return hasattr(attn, "processor") and hasattr(attn, "rescale_output_factor")


def _check_diffusers(name: str, attn) -> None:
    processor = type(attn.processor).__name__
    if processor not in PLAIN_PROCESSORS:
        raise ValueError(f"patch cannot split attention {name}: its processor {processor} is not one it reproduces "
                         f"({', '.join(PLAIN_PROCESSORS)}); use cfg or batch for this model")
    for part in ("spatial_norm", "group_norm", "norm_cross"):
        if getattr(attn, part, None) is not None:
            raise ValueError(f"patch cannot split attention {name}: it has a {part}, which UNets of SD1.x and SDXL "
                             "do not; use cfg or batch for this model")


def wrap(attn: nn.Module, group) -> None:
    """Replaces `attn`'s forward (an instance attribute; `models/unet_patch.py` restores the class's) by one whose
    self-attention takes every band's keys and values from `group.keys_values`."""
    original = attn.forward
    attn.forward = (_diffusers_forward if _is_diffusers(attn) else _comfy_forward)(attn, group, original)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H*D) -> (B, H, L, D)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, scale: float | None) -> torch.Tensor:
    """q, k, v (B, H, L, D) of this band -> (B, L, H*D): q attends to every band's keys and values."""
    merged = None
    for keys, values in group.keys_values(k.contiguous(), v.contiguous()):
        merged = merge(merged, block_attention(q, keys, values, scale))
    return merged[0].to(q.dtype).transpose(1, 2).flatten(2)


def _diffusers_forward(attn, group, original):
    def forward(hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if encoder_hidden_states is not None:
            return original(hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        if attention_mask is not None or kwargs or hidden_states.dim() != 3:
            raise ValueError("patch cannot split a self-attention given a mask or cross-attention arguments: use "
                             "cfg or batch for this call")
        q, k, v = (_heads(proj(hidden_states), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        out = attn.to_out[1](attn.to_out[0](_attend(q, k, v, group, attn.scale)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    return forward


def _comfy_forward(attn, group, original):
    def forward(x, context=None, value=None, mask=None, **kwargs):
        if context is not None or value is not None or mask is not None:
            return original(x, context=context, value=value, mask=mask, **kwargs)
        q, k, v = (_heads(proj(x), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        return attn.to_out(_attend(q, k, v, group, None))

    return forward
