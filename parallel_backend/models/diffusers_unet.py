"""diffusers UNet2DConditionModel: how one call runs, and the model as a sequence of layers for stages.

The layer sequence reproduces UNet2DConditionModel.forward for the SD1.x / SD2.x / SDXL configurations
(cross-attention blocks, SDXL's text-time embedding): conv_in, then every resnet, attention, down- and
upsampler of the down, mid and up blocks, then the output head. One stage covering all of them equals the
model's own forward. Inputs it does not reproduce (ControlNet/adapter residuals, masks, GLIGEN, FreeU) make
`prepare` raise and say so.
"""

from __future__ import annotations

import torch

from .stages import Activations, Context, Layer

FAMILY = "diffusers_unet"
SUPPORTED_EXTRAS = {"added_cond_kwargs"}


def forward(unet, call) -> torch.Tensor:
    """Runs `unet` on a ModelCall; returns the noise prediction (B, C, H, W)."""
    return unet(call.x, call.t, encoder_hidden_states=call.context, return_dict=False, **call.extras)[0]


def shared_modules(unet) -> list:
    names = ("time_embedding", "class_embedding", "add_embedding", "encoder_hid_proj", "time_embed_act")
    return [m for m in (getattr(unet, n, None) for n in names) if isinstance(m, torch.nn.Module)]


def prepare(unet, call, timestep) -> Context:
    unsupported = set(call.extras) - SUPPORTED_EXTRAS
    if unsupported:
        raise ValueError(f"asyncdiff cannot cut a diffusers UNet call with {', '.join(sorted(unsupported))}; "
                         "use strategy cfg or batch for it")
    if unet.config.addition_embed_type == "image_hint" or getattr(unet, "position_net", None) is not None:
        raise ValueError("asyncdiff supports the SD/SDXL UNet layouts; this UNet has image hints or GLIGEN")
    sample = call.x
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    added = call.extras.get("added_cond_kwargs")
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    if unet.get_class_embed(sample=sample, class_labels=None) is not None:
        raise ValueError("asyncdiff does not support class-conditioned diffusers UNets")
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=call.context, added_cond_kwargs=added)
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    context = unet.process_encoder_hidden_states(encoder_hidden_states=call.context, added_cond_kwargs=added)
    factor = 2 ** unet.num_upsamplers
    resize = any(dim % factor for dim in sample.shape[-2:])
    return Context(emb, context, sample, {"resize": resize})


def _push(acts: Activations) -> None:
    acts.skips.append(acts.h)


def _resnet(resnet, push: bool = False, pop: bool = False):
    def run(ctx: Context, acts: Activations) -> None:
        if pop:
            acts.h = torch.cat([acts.h, acts.skips.pop()], dim=1)
        acts.h = resnet(acts.h, ctx.temb)
        if push:
            _push(acts)
    return run


def _attention(attn, push: bool = False):
    def run(ctx: Context, acts: Activations) -> None:
        acts.h = attn(acts.h, encoder_hidden_states=ctx.context, return_dict=False)[0]
        if push:
            _push(acts)
    return run


def layers(unet) -> list[Layer]:
    out = []

    def conv_in(ctx: Context, acts: Activations) -> None:
        acts.h = unet.conv_in(acts.h)
        _push(acts)

    out.append(Layer("conv_in", (unet.conv_in,), conv_in))
    for i, block in enumerate(unet.down_blocks):
        attentions = list(getattr(block, "attentions", None) or [])
        for j, resnet in enumerate(block.resnets):
            has_attn = j < len(attentions)
            out.append(Layer(f"down{i}.resnet{j}", (resnet,), _resnet(resnet, push=not has_attn)))
            if has_attn:
                out.append(Layer(f"down{i}.attention{j}", (attentions[j],), _attention(attentions[j], push=True)))
        if block.downsamplers is not None:
            def down(ctx, acts, samplers=block.downsamplers):
                for sampler in samplers:
                    acts.h = sampler(acts.h)
                _push(acts)
            out.append(Layer(f"down{i}.downsample", tuple(block.downsamplers), down))
    mid = unet.mid_block
    if mid is not None:
        attentions = list(getattr(mid, "attentions", None) or [])
        out.append(Layer("mid.resnet0", (mid.resnets[0],), _resnet(mid.resnets[0])))
        for j, (attn, resnet) in enumerate(zip(attentions, mid.resnets[1:])):
            out.append(Layer(f"mid.attention{j}", (attn,), _attention(attn)))
            out.append(Layer(f"mid.resnet{j + 1}", (resnet,), _resnet(resnet)))
    for i, block in enumerate(unet.up_blocks):
        if any(getattr(block, name, None) for name in ("s1", "s2", "b1", "b2")):
            raise ValueError("asyncdiff does not reproduce FreeU; disable it (pipe.disable_freeu())")
        attentions = list(getattr(block, "attentions", None) or [])
        for j, resnet in enumerate(block.resnets):
            out.append(Layer(f"up{i}.resnet{j}", (resnet,), _resnet(resnet, pop=True)))
            if j < len(attentions):
                out.append(Layer(f"up{i}.attention{j}", (attentions[j],), _attention(attentions[j])))
        if block.upsamplers is not None:
            def up(ctx, acts, samplers=block.upsamplers):
                size = acts.skips[-1].shape[2:] if ctx.extra["resize"] and acts.skips else None
                for sampler in samplers:
                    acts.h = sampler(acts.h, size)
            out.append(Layer(f"up{i}.upsample", tuple(block.upsamplers), up))

    def head(ctx: Context, acts: Activations) -> None:
        h = acts.h
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        acts.h = unet.conv_out(h)

    out.append(Layer("out", (unet.conv_norm_out, unet.conv_out), head))
    return out
