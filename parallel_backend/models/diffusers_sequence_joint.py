"""SD3 / SD3.5's attention for a split call: diffusers' JointAttnProcessor2_0 calls torch's
`F.scaled_dot_product_attention` itself, and replacing that function would reach every caller in the process.
So for the call each marked attention module's processor is swapped (and always restored) for
`GroupJointAttention`: the same projections and norms through the module's own layers, the attention sent to
the group. Only the row's stock processor is swapped; any other (IP-adapter, PAG, fused, custom) is refused
before compute, since what it does beyond the stock one would be lost. A model must not run elsewhere during
its split call (a worker runs one call at a time). Where the tokens are cut: sequence_splits.py `DIFFUSERS`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .attention_route import current


@contextmanager
def group_processors(row, attentions):
    """While inside, every marked attention module (`attentions`: (path, module, Attend)) runs
    `GroupJointAttention`; restores their processors on exit."""
    from diffusers.models import attention_processor

    stock = getattr(attention_processor, row.processor)
    for path, module, _ in attentions:
        if type(module.processor) is not stock:
            raise ValueError(f"sequence parallel: the attention processor of {row.label} {path} is "
                             f"{type(module.processor).__name__}; only diffusers' {row.processor} can be split: "
                             "use the model's default attention processor")
    originals = [module.processor for _, module, _ in attentions]
    try:
        for _, module, _ in attentions:
            module.set_processor(GroupJointAttention())
        yield
    finally:
        for (_, module, _), original in zip(attentions, originals):
            module.set_processor(original)


class GroupJointAttention:
    """An SD3 attention module's processor for one split call: its own layers project this rank's image tokens
    (and text tokens, when given) as JointAttnProcessor2_0 does, and the call's group attends them over the cut
    its route gives this module."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        # The same signature as JointAttnProcessor2_0, which takes an attention mask and ignores it: so does this
        # one, so that a split call computes what the plain call does.
        streams = [_project(hidden_states, attn.heads, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)]
        if encoder_hidden_states is not None:
            streams.append(_project(encoder_hidden_states, attn.heads, attn.add_q_proj, attn.add_k_proj,
                                    attn.add_v_proj, attn.norm_added_q, attn.norm_added_k))
        q, k, v = (torch.cat(parts, 2) for parts in zip(*streams))
        route = current()
        shards = route.take()
        out = route.group.attention(q, k, v, shards).transpose(1, 2).flatten(2)  # (B, L_r, H * D)
        image, text = out.split([hidden_states.shape[1], out.shape[1] - hidden_states.shape[1]], 1)
        for layer in attn.to_out:  # linear, dropout
            image = layer(image)
        if encoder_hidden_states is None:
            return image
        return image, (text if attn.context_pre_only else attn.to_add_out(text))


def _project(x, heads, to_q, to_k, to_v, norm_q, norm_k):
    """q, k, v (B, H, L, D) of tokens x (B, L, dim), q and k normed where the module norms them."""
    q, k, v = (layer(x).unflatten(-1, (heads, -1)).transpose(1, 2) for layer in (to_q, to_k, to_v))
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v
