"""diffusers' Qwen-Image and SD3 / SD3.5 transformers with their token sequence split over a sequence-parallel group.

The same scheme as Flux and Wan (diffusers_sequence.py, whose docstring says why it is exact): every rank runs
the per-token layers on its contiguous shard of each token stream, the attentions that mix tokens are computed
by the group, and the image tokens are gathered after `proj_out`, so every rank returns the whole output. Both
families attend text and image tokens jointly, and BOTH streams are cut: the text tokens go through every block
beside the image tokens (Qwen-Image: up to 512 prompt tokens; SD3: 77 CLIP + 256 T5 = 333; at 1024 px, 4096
image tokens each), so replicating them would leave that share undivided on every rank and cap the speed-up.

Qwen-Image (joint order [text, image]; its processor calls diffusers' `dispatch_attention_fn`, so
`split_attention` routes it):
- The latent tokens, the text tokens and the ControlNet residuals (on image tokens) are cut before the call.
- RoPE: `pos_embed` returns an image table (from `img_shapes`) and a text table (from the text length); a
  pre-hook gives it the whole text length (the model would pass its shard's), a hook cuts each table with its
  stream. The edit models' per-token `modulate_index` (`zero_cond_t`) is cut by a pre-hook on each block.
- Text padding (`encoder_hidden_states_mask`, (B, L_txt)) masks keys only (every query sees the same mask), so
  it is kept from the model and given to the group as a key mask over the joint sequence: the text's mask, then
  every image token. diffusers' Qwen RoPE fails on an empty shard, so a text shorter than the degree (a short
  negative prompt on many ranks) is padded to one token per rank, the pads masked as keys; fewer image tokens
  than ranks is refused.

SD3 / SD3.5 (joint order [image, text]): diffusers' JointAttnProcessor2_0 calls torch's
`F.scaled_dot_product_attention` itself, and replacing that function would reach every caller in the process.
So for the call each attention module's processor is swapped (and always restored) for `GroupJointAttention`:
the same projections and norms through the module's own layers, the attention sent to the group. Only the
stock JointAttnProcessor2_0 is swapped; any other (IP-adapter, PAG, fused, custom) is refused before compute,
since what it does beyond the stock one would be lost. A model must not run elsewhere during its split call (a
worker runs one call at a time).
- Positions are an absolute table that `pos_embed` adds while it patchifies (cropped to the image's size, so it
  runs on the whole grid); a hook on it cuts its output. The text is cut before the call: `context_embedder` is
  a per-token linear, so cutting its input equals cutting its output, for less work. ControlNet residuals are
  cut with the image tokens; the gather is a hook on `proj_out`, before the model unpatchifies.
- SD3.5's dual-attention blocks have a second, image-only self-attention (`attn2`): it is split over the image
  cut alone.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from .diffusers_sequence import piece, split_attention


def qwen_image_sequence(model, call, group) -> torch.Tensor:
    """QwenImageTransformer2DModel's output for `call` (x: (B, L_img, C) packed latents, context: (B, L_txt, D),
    optional `encoder_hidden_states_mask` (B, L_txt)), computed with both token streams split over `group`; the
    whole (B, L_img, C_out) on every rank."""
    group.check_heads(model.config.num_attention_heads)
    image = call.x.shape[1]
    if image < group.degree:  # diffusers' Qwen RoPE cannot take an empty shard
        raise ValueError(f"Qwen-Image's {image} image tokens cannot be split over {group.degree} ranks (each needs "
                         "at least one): use a smaller ulysses / ring degree for this image size")
    extras = dict(call.extras)
    context, key_mask = _text_and_key_mask(call.context, extras.pop("encoder_hidden_states_mask", None), image,
                                           group.degree)
    text = context.shape[1]
    if extras.get("controlnet_block_samples") is not None:
        extras["controlnet_block_samples"] = [piece(group, r, 1) for r in extras["controlnet_block_samples"]]

    def whole_text(module, args, kwargs):
        return args, {**kwargs, "max_txt_seq_len": text}

    def cut_tables(module, args, tables):  # image (L_img, D/2), text (L_txt, D/2), complex
        return piece(group, tables[0], 0), piece(group, tables[1], 0)

    def cut_modulate_index(module, args, kwargs):  # (B, L_img): which image of an edit call a token is from
        index = kwargs.get("modulate_index")
        return args, (kwargs if index is None else {**kwargs, "modulate_index": piece(group, index, 1)})

    attentions = [block.attn for block in model.transformer_blocks]
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(split_attention(attentions, group, group.shards(text, image), key_mask))
        stack.enter_context(model.pos_embed.register_forward_pre_hook(whole_text, with_kwargs=True))
        stack.enter_context(model.pos_embed.register_forward_hook(cut_tables))
        for block in model.transformer_blocks:
            stack.enter_context(block.register_forward_pre_hook(cut_modulate_index, with_kwargs=True))
        out = model(hidden_states=piece(group, call.x, 1), timestep=call.t,
                    encoder_hidden_states=piece(group, context, 1), return_dict=False, **extras)[0]
    return group.all_gather(out, group.shards(image), 1)


def _text_and_key_mask(context: torch.Tensor, mask: torch.Tensor | None, image: int, degree: int):
    """Qwen-Image's text tokens (B, L_txt, D) as the ranks cut them, and its text mask (B, L_txt; nonzero: a
    real token) as a key mask over [text, image], None when every key takes part. Text shorter than the degree
    is padded to one token per rank, the pads masked: diffusers' Qwen RoPE cannot take an empty shard, and a
    masked key changes no output (the pads' own outputs stay in the text stream, which the model drops)."""
    rows, text = context.shape[:2]
    if mask is None:
        mask = torch.ones(rows, text, dtype=torch.bool, device=context.device)
    elif tuple(mask.shape) != (rows, text):
        raise ValueError(f"encoder_hidden_states_mask is {tuple(mask.shape)}; it must be (rows, text tokens) = "
                         f"{(rows, text)}")
    mask, pads = mask.to(torch.bool), max(degree - text, 0)
    if pads:
        context = torch.cat([context, context.new_zeros(rows, pads, context.shape[2])], 1)
        mask = torch.cat([mask, mask.new_zeros(rows, pads)], 1)
    return context, (None if bool(mask.all()) else torch.cat([mask, mask.new_ones(rows, image)], 1))


def sd3_sequence(model, call, group) -> torch.Tensor:
    """SD3Transformer2DModel's output for `call` (x: (B, C, H, W) latents, context: (B, L_txt, D)), computed with
    both token streams split over `group`; the whole (B, C_out, H, W) on every rank."""
    group.check_heads(model.config.num_attention_heads)
    patch = model.config.patch_size
    image = (call.x.shape[-2] // patch) * (call.x.shape[-1] // patch)
    images = group.shards(image)
    extras = dict(call.extras)
    if extras.get("block_controlnet_hidden_states") is not None:
        extras["block_controlnet_hidden_states"] = [piece(group, r, 1)
                                                    for r in extras["block_controlnet_hidden_states"]]

    def cut_tokens(module, args, tokens):  # (B, L_img, dim), positions added
        return images.cut(tokens, group.index, 1)

    def gather(module, args, out):
        return group.all_gather(out, images, 1)

    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(group_processors(model, group, group.shards(image, call.context.shape[1]), images))
        stack.enter_context(model.pos_embed.register_forward_hook(cut_tokens))
        stack.enter_context(model.proj_out.register_forward_hook(gather))
        return model(hidden_states=call.x, timestep=call.t, encoder_hidden_states=piece(group, call.context, 1),
                     return_dict=False, **extras)[0]


@contextmanager
def group_processors(model, group, joint, images):
    """While inside, every attention of an SD3 transformer's blocks runs `GroupJointAttention`: the joint
    attentions over `joint`, SD3.5's image-only `attn2` over `images`. Restores the processors on exit."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    plan = []
    for index, block in enumerate(model.transformer_blocks):
        plan.append((block.attn, joint, f"block {index} attn"))
        if block.attn2 is not None:
            plan.append((block.attn2, images, f"block {index} attn2"))
    for module, _, label in plan:
        if type(module.processor) is not JointAttnProcessor2_0:
            raise ValueError(f"sequence parallel: the attention processor of SD3 {label} is "
                             f"{type(module.processor).__name__}; only diffusers' JointAttnProcessor2_0 can be "
                             "split: use the model's default attention processor")
    originals = [module.processor for module, _, _ in plan]
    try:
        for module, shards, _ in plan:
            module.set_processor(GroupJointAttention(group, shards))
        yield
    finally:
        for (module, _, _), original in zip(plan, originals):
            module.set_processor(original)


class GroupJointAttention:
    """An SD3 attention module's processor for one split call: its own layers project this rank's image tokens
    (and text tokens, when given) as JointAttnProcessor2_0 does, and `group` attends them over `shards`."""

    def __init__(self, group, shards):
        self.group, self.shards = group, shards

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        # The same signature as JointAttnProcessor2_0, which takes an attention mask and ignores it: so does this
        # one, so that a split call computes what the plain call does.
        streams = [_project(hidden_states, attn.heads, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)]
        if encoder_hidden_states is not None:
            streams.append(_project(encoder_hidden_states, attn.heads, attn.add_q_proj, attn.add_k_proj,
                                    attn.add_v_proj, attn.norm_added_q, attn.norm_added_k))
        q, k, v = (torch.cat(parts, 2) for parts in zip(*streams))
        out = self.group.attention(q, k, v, self.shards).transpose(1, 2).flatten(2)  # (B, L_r, H * D)
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
