"""ComfyUI's openaimodel.UNetModel (SD1.x / SD2.x / SDXL), duck-typed: nothing here imports ComfyUI.

The worker holds the host's own UNetModel object (unpickled with the host's ComfyUI on its import path) and
calls it as ComfyUI's BaseModel does. The call's extras carry `y` (SDXL's ADM vector), `control` (ControlNet
residuals computed by the host) and a `transformer_options` dict holding only plain data.

For stages, the layer sequence follows UNetModel._forward: every layer of every input block (ControlNet's
residual added and the skip pushed after each block), the middle block, every layer of every output block
(the skip popped, with its residual, before each block), then the output head. Layers are run through the
model's own module's `forward_timestep_embed`, found from the object's class, so each layer gets exactly the
arguments the model's forward would give it.
"""

from __future__ import annotations

import importlib

import torch

from .stages import Activations, Context, Layer

FAMILY = "comfy_unet"
SUPPORTED_EXTRAS = {"y", "control", "transformer_options"}


def forward(unet, call) -> torch.Tensor:
    """Runs ComfyUI's UNetModel on a ModelCall; returns the model output (B, C, H, W)."""
    extras = dict(call.extras)
    extras.setdefault("transformer_options", {})
    return unet(call.x, call.t, context=call.context, **extras)


def _home(unet):
    """The module UNetModel is defined in (it holds forward_timestep_embed and timestep_embedding)."""
    return importlib.import_module(type(unet).__module__)


def shared_modules(unet) -> list:
    return [m for m in (unet.time_embed, getattr(unet, "label_emb", None)) if isinstance(m, torch.nn.Module)]


def prepare(unet, call, timestep) -> Context:
    unsupported = set(call.extras) - SUPPORTED_EXTRAS
    if unsupported:
        raise ValueError(f"asyncdiff cannot cut a ComfyUI UNet call with {', '.join(sorted(unsupported))}; "
                         "use strategy cfg or batch for it")
    if getattr(unet, "predict_codebook_ids", False):
        raise ValueError("asyncdiff does not support UNets predicting codebook ids")
    options = dict(call.extras.get("transformer_options") or {})
    options["original_shape"] = list(call.x.shape)
    t_emb = _home(unet).timestep_embedding(timestep, unet.model_channels, repeat_only=False).to(call.x.dtype)
    emb = unet.time_embed(t_emb)
    y = call.extras.get("y")
    if (y is not None) != (unet.num_classes is not None):
        raise ValueError("the UNet expects 'y' (an ADM vector) if and only if it is class-conditional")
    if y is not None:
        emb = emb + unet.label_emb(y)
    return Context(emb, call.context, call.x, {"options": options, "control": call.extras.get("control") or {}})


def _residual(ctx: Context, kind: str, index: int):
    """ControlNet's residual for block `index` of `kind`: UNetModel pops these lists from the end."""
    entries = ctx.extra["control"].get(kind) or []
    return entries[len(entries) - 1 - index] if index < len(entries) else None


def _add(h: torch.Tensor, residual) -> torch.Tensor:
    if residual is None:
        return h
    try:
        return h + residual
    except RuntimeError:  # ComfyUI skips a residual of the wrong shape too (with a warning)
        return h


def layers(unet) -> list[Layer]:
    embed = _home(unet).forward_timestep_embed
    out, transformers = [], 0

    def layer_run(layer, block, transformer_index, before=None, after=None):
        def run(ctx: Context, acts: Activations) -> None:
            options = ctx.extra["options"]
            options["block"], options["transformer_index"] = block, transformer_index
            if before is not None:
                before(ctx, acts)
            # output blocks upsample to the next skip's size (odd latent sizes), as UNetModel does
            output_shape = acts.skips[-1].shape if block[0] == "output" and acts.skips else None
            acts.h = embed([layer], acts.h, ctx.temb, ctx.context, options, output_shape)
            if after is not None:
                after(ctx, acts)
        return run

    def is_transformer(layer) -> bool:
        return "Transformer" in type(layer).__name__

    for i, block in enumerate(unet.input_blocks):
        for j, layer in enumerate(block):
            after = None
            if j == len(block) - 1:
                def after(ctx, acts, i=i):
                    acts.h = _add(acts.h, _residual(ctx, "input", i))
                    acts.skips.append(acts.h)
            out.append(Layer(f"input{i}.{type(layer).__name__}{j}", (layer,),
                             layer_run(layer, ("input", i), transformers, after=after)))
            transformers += is_transformer(layer)
    middle = list(unet.middle_block) if unet.middle_block is not None else []
    for j, layer in enumerate(middle):
        after = None
        if j == len(middle) - 1:
            def after(ctx, acts):
                acts.h = _add(acts.h, _residual(ctx, "middle", 0))
        out.append(Layer(f"middle.{type(layer).__name__}{j}", (layer,),
                         layer_run(layer, ("middle", 0), transformers, after=after)))
        transformers += is_transformer(layer)
    for i, block in enumerate(unet.output_blocks):
        for j, layer in enumerate(block):
            before = None
            if j == 0:
                def before(ctx, acts, i=i):
                    skip = _add(acts.skips.pop(), _residual(ctx, "output", i))
                    acts.h = torch.cat([acts.h, skip], dim=1)
            out.append(Layer(f"output{i}.{type(layer).__name__}{j}", (layer,),
                             layer_run(layer, ("output", i), transformers, before=before)))
            transformers += is_transformer(layer)

    def head(ctx: Context, acts: Activations) -> None:
        acts.h = unet.out(acts.h.type(ctx.x.dtype))

    out.append(Layer("out", (unet.out,), head))
    return out
