"""diffusers' DiTs as a chain of blocks that can be cut into stages and run on patches of tokens (pipefusion).

The contract of models/stages.py (a list of `Layer`s run on `Activations` under a `Context`), for transformers:
- `tokens(model, call) -> Activations`: the embedders (the first stage's): `h` the image (or video) tokens
  (B, L, D); for a joint-attention model `skips` = [the text tokens (B, T, D)].
- `context(model, call) -> Context`: what every stage computes for itself from the call: the timestep
  embedding, the rotary tables of the whole sequence, Wan's text for its cross-attention (`shared` modules).
- `layers(model)`: one Layer per transformer block, in order.
- `finish(model, call, ctx, h) -> output`: the last stage's output norm, projection (and unpatchify).
- `patch(ctx, positions)`: the context of a patch of the tokens: the rotary rows of its positions in the joint
  sequence the attention sees (`joint`: the streams in that order, as sequence_splits.py names them).
- `refuse(call)`: a one-sentence ValueError for what a patched call cannot take.
- `width(model, call) -> (width, dtype)`: the tokens' width and dtype as they cross between stages.
The attentions a patch computes against the whole sequence are the family's `Attend` rows of its host's table
in sequence_splits.py (`host`: DIFFUSERS, reached through diffusers_sequence.group_attention; COMFY, reached
through ComfyUI's attention override, which the family's `run` hands every block: comfy_dit_stages.py).
`placeholder`: the `Attend` modules whose blocks cannot take an empty stream (ComfyUI's Flux double blocks, Chroma's
and HunyuanVideo's too, and Qwen-Image blocks; diffusers' Qwen-Image blocks), given a patch after patch 0, which
holds no text: the block gets one token standing in for it, leading in the joint order, which the attention leaves
out (runner.Rows.lead) and whose output is dropped.
`modulation`: the paths, in a block, of its adaLN modulation projections (a Linear applied to
`modulation_input(ctx)`, by default silu of the time embedding, and to nothing per token): any stage can hold them,
computing their vectors once per call for the block's stage (strategies/pipefusion/cut.py and runner.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .comfy_forward import at_first_block, inputs, once_per_call
from .diffusers_dit import forward
from .sequence_splits import COMFY, DIFFUSERS, IMAGE, TEXT, VIDEO
from .stages import Activations, Context, Layer


@dataclass(frozen=True)
class PipeFamily:
    name: str  # the family as it travels ("diffusers_dit:flux")
    label: str
    blocks: tuple[str, ...]  # the block lists, in execution order
    streams: tuple[str, ...]  # what Activations hold: [h, *skips], by stream
    joint: tuple[str, ...]  # the streams in the order the attentions join them
    first: Callable  # model -> the first stage's modules (embedders)
    last: Callable  # model -> the last stage's modules and tensors (norm, projection)
    shared: Callable  # model -> what every stage holds (the per-call embedders)
    tokens: Callable
    context: Callable
    run: Callable  # (block, ctx, acts) -> None: one block on the activations, in place
    finish: Callable
    counts: Callable  # (model, call) -> tokens of each stream, in `streams` order
    rotary_dim: int  # the token dim of the rotary tables
    refuse: Callable  # call -> None, or raises ValueError
    width: Callable = lambda model, call: (model.config.num_attention_heads * model.config.attention_head_dim,
                                           model.dtype)
    host: str = "diffusers"  # whose sequence splits table and attention entry point: "diffusers" or "comfy"
    placeholder: tuple[str, ...] = ()  # Attend modules whose blocks get a stand-in token for an empty stream
    modulation: tuple[str, ...] = ()  # a block's modulation projections, by path: applied to modulation_input only
    modulation_input: Callable = lambda ctx: torch.nn.functional.silu(ctx.temb)  # ctx -> what they are applied to

    def layers(self, model) -> list[Layer]:
        return [Layer(f"{blocks}.{i}", (block,), lambda ctx, acts, block=block: self.run(block, ctx, acts))
                for blocks in self.blocks for i, block in enumerate(getattr(model, blocks))]

    def modulations(self, layer: Layer) -> list[tuple[str, torch.nn.Module]]:
        """(path in the block, module) of the layer's block's modulation projections: weights with no per-token work,
        whose output (rows, out_features) any stage can compute from `modulation_input(ctx)` and send (runner.py)."""
        block, out = layer.modules[0], []
        for path in self.modulation:
            try:
                out.append((path, block.get_submodule(path)))
            except AttributeError:  # a block of the other kind (Flux's single blocks have no norm1_context)
                continue
        return out

    def count(self, model, call) -> dict[str, int]:
        """Tokens per stream of the call's whole sequence, from its shapes (in `streams` order)."""
        return dict(zip(self.streams, self.counts(model, call)))

    def patch(self, ctx: Context, positions: torch.Tensor) -> Context:
        if "rotary" not in ctx.extra:  # absolute positions, added with the tokens' embedding
            return ctx
        tables = ctx.extra["rotary"]  # (cos, sin), or ComfyUI's one table
        rows = positions.to(tables[0].device)
        cut = tuple(t.index_select(self.rotary_dim, rows) for t in tables)
        return replace(ctx, extra={**ctx.extra, "rotary": cut})

    def row(self):
        """The family's sequence split (sequence_splits.DIFFUSERS or COMFY): which attentions mix tokens, over
        which streams, and how diffusers' processors reach a route. Its last row: a host version's variant (v0.8's
        HunyuanVideo, [video, text]) comes first, and the family's `run` puts the streams in the last row's order."""
        return (COMFY if self.host == "comfy" else DIFFUSERS)[self.name.split(":", 1)[1]][-1]

    def attends(self) -> tuple:
        return self.row().attend

    def routing(self, attentions):
        """While inside, the routed attentions (`attentions`: (path, module, Attend)) reach the call's route:
        diffusers' dispatcher redirected; ComfyUI's attention reaches it through the override in the options
        the family's `run` passes every block."""
        if self.host == "comfy":
            return nullcontext()
        from .diffusers_sequence import group_attention

        return group_attention(self.row(), attentions)


def first_block_streams(inputs, image: str, text: str) -> tuple[Callable, Callable]:
    """(`tokens`, `counts`) of a joint-attention family whose forward embeds the tokens before its first block
    (`inputs`: (model, call) -> what that block is handed, by name; `image`, `text`: its two token streams' names)."""
    def tokens(model, call) -> Activations:
        named = inputs(model, call)
        return Activations(named[image], [named[text]])

    def counts(model, call) -> tuple[int, int]:
        named = inputs(model, call)
        return named[image].shape[1], named[text].shape[1]

    return tokens, counts


# ---- Flux.1 (FluxTransformer2DModel): double-stream then single-stream blocks, text first in every attention ----

def _flux_refuse(call) -> None:
    for name in ("controlnet_block_samples", "controlnet_single_block_samples"):
        if call.extras.get(name) is not None:
            raise ValueError("pipefusion does not run Flux with ControlNet residuals; use cfg, batch or ulysses")
    if call.extras.get("joint_attention_kwargs"):
        raise ValueError("pipefusion does not run Flux with joint_attention_kwargs (IP-adapter, LoRA scale); use "
                         "cfg, batch or ulysses")


def _flux_tokens(model, call) -> Activations:
    return Activations(model.x_embedder(call.x), [model.context_embedder(call.context)])


def _flux_context(model, call) -> Context:
    dtype = model.x_embedder.weight.dtype
    timestep = call.t.to(dtype).reshape(-1).expand(call.rows) * 1000
    guidance = call.extras.get("guidance")
    pooled = call.extras.get("pooled_projections")
    temb = (model.time_text_embed(timestep, pooled) if guidance is None
            else model.time_text_embed(timestep, guidance.to(dtype) * 1000, pooled))
    txt_ids, img_ids = (call.extras[n][0] if call.extras[n].ndim == 3 else call.extras[n] for n in ("txt_ids", "img_ids"))
    rotary = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    return Context(temb, None, call.x, {"rotary": tuple(rotary)})


def _flux_run(block, ctx: Context, acts: Activations) -> None:
    acts.skips[0], acts.h = block(hidden_states=acts.h, encoder_hidden_states=acts.skips[0], temb=ctx.temb,
                                  image_rotary_emb=ctx.extra["rotary"])


def _flux_finish(model, call, ctx: Context, h: torch.Tensor) -> torch.Tensor:
    return model.proj_out(model.norm_out(h, ctx.temb))


FLUX = PipeFamily(
    "diffusers_dit:flux", "Flux.1", ("transformer_blocks", "single_transformer_blocks"), (IMAGE, TEXT),
    (TEXT, IMAGE), first=lambda m: [m.x_embedder, m.context_embedder], last=lambda m: [m.norm_out, m.proj_out],
    shared=lambda m: [m.time_text_embed, m.pos_embed], tokens=_flux_tokens, context=_flux_context, run=_flux_run,
    finish=_flux_finish, counts=lambda m, call: (call.x.shape[1], call.context.shape[1]), rotary_dim=0, refuse=_flux_refuse,
    modulation=("norm1.linear", "norm1_context.linear", "norm.linear"))


# ---- Wan 2.1 / 2.2 (WanTransformer3DModel): video self-attention, text cross-attention in every block ----

def _wan_refuse(call) -> None:
    if call.t.ndim == 2:
        raise ValueError("pipefusion does not run Wan 2.2 TI2V's per-token timesteps; use cfg, batch or ulysses")
    if call.extras.get("attention_kwargs"):
        raise ValueError("pipefusion does not run Wan with attention_kwargs (LoRA scale); use cfg, batch or ulysses")


def _wan_tokens(model, call) -> Activations:
    return Activations(model.patch_embedding(call.x).flatten(2).transpose(1, 2).contiguous())


def _wan_context(model, call) -> Context:
    rotary = model.rope(call.x)
    temb, projected, text, image = model.condition_embedder(call.t.reshape(-1).expand(call.rows), call.context,
                                                            call.extras.get("encoder_hidden_states_image"))
    if image is not None:
        text = torch.concat([image, text], dim=1)
    return Context(temb, text, call.x, {"rotary": tuple(rotary), "projected": projected.unflatten(1, (6, -1))})


def _wan_run(block, ctx: Context, acts: Activations) -> None:
    acts.h = block(acts.h, ctx.context, ctx.extra["projected"], ctx.extra["rotary"])


def _wan_counts(model, call) -> tuple[int]:
    p_t, p_h, p_w = model.config.patch_size
    frames, height, width = call.x.shape[2:]
    return ((frames // p_t) * (height // p_h) * (width // p_w),)


def _wan_finish(model, call, ctx: Context, h: torch.Tensor) -> torch.Tensor:
    rows, _, frames, height, width = call.x.shape
    p_t, p_h, p_w = model.config.patch_size
    shift, scale = (model.scale_shift_table.to(ctx.temb.device) + ctx.temb.unsqueeze(1)).chunk(2, dim=1)
    h = (model.norm_out(h.float()) * (1 + scale) + shift).type_as(h)
    h = model.proj_out(h).reshape(rows, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
    return h.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


WAN = PipeFamily(
    "diffusers_dit:wan", "Wan", ("blocks",), (VIDEO,), (VIDEO,), first=lambda m: [m.patch_embedding],
    last=lambda m: [m.norm_out, m.proj_out, m.scale_shift_table], shared=lambda m: [m.rope, m.condition_embedder],
    tokens=_wan_tokens, context=_wan_context, run=_wan_run, finish=_wan_finish, counts=_wan_counts, rotary_dim=1, refuse=_wan_refuse)


# ---- SD3 / SD3.5 (SD3Transformer2DModel): joint blocks, image first in every attention; SD3.5's second,
# image-only attention (attn2) is routed too; the last block keeps no text stream (context_pre_only) ----

def _sd3_refuse(call) -> None:
    for name, what in (("block_controlnet_hidden_states", "ControlNet residuals"), ("skip_layers", "skip_layers"),
                       ("joint_attention_kwargs", "joint_attention_kwargs (IP-adapter, LoRA scale)")):
        if call.extras.get(name):
            raise ValueError(f"pipefusion does not run SD3 with {what}; use cfg, batch or ulysses")


def _sd3_tokens(model, call) -> Activations:
    return Activations(model.pos_embed(call.x).contiguous(), [model.context_embedder(call.context)])


def _sd3_context(model, call) -> Context:
    temb = model.time_text_embed(call.t.reshape(-1).expand(call.rows), call.extras.get("pooled_projections"))
    return Context(temb, None, call.x, {})


def _sd3_run(block, ctx: Context, acts: Activations) -> None:
    acts.skips[0], acts.h = block(hidden_states=acts.h, encoder_hidden_states=acts.skips[0], temb=ctx.temb)


def _sd3_counts(model, call) -> tuple[int, int]:
    p = model.config.patch_size
    return (call.x.shape[-2] // p) * (call.x.shape[-1] // p), call.context.shape[1]


def _sd3_finish(model, call, ctx: Context, h: torch.Tensor) -> torch.Tensor:
    p, (height, width) = model.config.patch_size, call.x.shape[-2:]
    h = model.proj_out(model.norm_out(h, ctx.temb))
    h = h.reshape(h.shape[0], height // p, width // p, p, p, model.out_channels)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(h.shape[0], model.out_channels, height, width)


SD3 = PipeFamily(
    "diffusers_dit:sd3", "SD3", ("transformer_blocks",), (IMAGE, TEXT), (IMAGE, TEXT),
    first=lambda m: [m.pos_embed, m.context_embedder], last=lambda m: [m.norm_out, m.proj_out],
    shared=lambda m: [m.time_text_embed], tokens=_sd3_tokens, context=_sd3_context, run=_sd3_run,
    finish=_sd3_finish, counts=_sd3_counts, rotary_dim=0, refuse=_sd3_refuse,
    modulation=("norm1.linear", "norm1_context.linear"))


# ---- Qwen-Image (QwenImageTransformer2DModel): joint blocks, text first in every attention. Its forward prepares
# the call (the text's norm, the rotary tables of the images and the text, the timestep embedding): every stage
# runs it up to the first block (comfy_forward.inputs; the embedders are `shared`, a small share of the weights).
# A block cannot take an empty text stream (its rotary reshape): a patch after patch 0 gives it one zero token
# that joins no attention (the family's placeholder) ----

QWEN_TAKES = frozenset({"hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "temb",
                        "image_rotary_emb"})


@once_per_call
def _qwen_inputs(model, call) -> dict:
    if model.config.zero_cond_t:
        raise ValueError("pipefusion does not run Qwen-Image with zero_cond_t (Qwen-Image-Edit-2511's modulation per "
                         "image token); use cfg, batch or ulysses")
    return inputs(model, call, QWEN_TAKES, "Qwen-Image", at_first_block, run=forward)


def _qwen_refuse(call) -> None:
    mask = call.extras.get("encoder_hidden_states_mask")
    for what, given in (("ControlNet residuals", call.extras.get("controlnet_block_samples") is not None),
                        ("attention_kwargs (LoRA scale)", bool(call.extras.get("attention_kwargs"))),
                        ("a text padding mask (encoder_hidden_states_mask)",
                         mask is not None and not bool(mask.all()))):
        if given:
            raise ValueError(f"pipefusion does not run Qwen-Image with {what}; use cfg, batch or ulysses")


def _qwen_context(model, call) -> Context:
    """The timestep embedding, and the rotary tables of the images and the text joined, text first, as one table of
    the joint sequence (L, D/2), which a patch's rows are cut from."""
    named = _qwen_inputs(model, call)
    image, text = named["image_rotary_emb"]
    rotary = torch.cat((text, image))
    return Context(named["temb"], None, call.x, {"rotary": (rotary,), "text_rotary": rotary[:1]})


def _qwen_run(block, ctx: Context, acts: Activations) -> None:
    txt, rotary = acts.skips[0], ctx.extra["rotary"][0]
    stood_in = not txt.shape[1]
    if stood_in:  # one zero token and a text position's rotary row before the patch's own
        txt, rotary = txt.new_zeros(txt.shape[0], 1, txt.shape[2]), torch.cat((ctx.extra["text_rotary"], rotary))
    text = txt.shape[1]
    txt, acts.h = block(hidden_states=acts.h, encoder_hidden_states=txt, encoder_hidden_states_mask=None,
                        temb=ctx.temb, image_rotary_emb=(rotary[text:], rotary[:text]))
    if not stood_in:
        acts.skips[0] = txt


_qwen_tokens, _qwen_counts = first_block_streams(_qwen_inputs, "hidden_states", "encoder_hidden_states")


QWEN_IMAGE = PipeFamily(
    "diffusers_dit:qwen_image", "Qwen-Image", ("transformer_blocks",), (IMAGE, TEXT), (TEXT, IMAGE),
    first=lambda m: [], last=lambda m: [m.norm_out, m.proj_out],
    shared=lambda m: [m.img_in, m.txt_norm, m.txt_in, m.time_text_embed, m.pos_embed], tokens=_qwen_tokens,
    context=_qwen_context, run=_qwen_run, finish=lambda m, call, ctx, h: m.proj_out(m.norm_out(h, ctx.temb)),
    counts=_qwen_counts, rotary_dim=0, refuse=_qwen_refuse, placeholder=("transformer_blocks.*.attn",))


FAMILIES = {family.name: family for family in (FLUX, WAN, SD3, QWEN_IMAGE)}
