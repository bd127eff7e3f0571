"""The VAEs Tandem can split into bands (models/vae_bands.py, the whole VAE banded): for each, how a latent is
decoded and an image encoded. A VAE not listed here takes its host's stock path. ComfyUI's HunyuanVideo VAEs are
listed: 1.0's (an AutoencoderKL of CarriedConv3d, 3D convolutions padded by their caller, `conv_carry_causal_3d`,
with the frames of the chunk before) and 1.5's and HunyuanImage 2.1's (an AutoencodingEngine of
`hunyuan_video/vae_refiner.py`'s or `hunyuan_video/vae.py`'s encoder and decoder). Not listed: an AutoencoderKL of
ComfyUI's VideoConv3d (3D convolutions that pad themselves), which ComfyUI builds only for a 3D VAE with attention
blocks outside its mid block, a configuration no checkpoint it detects has.

ComfyUI's LTX-Video decoder conditioned on the timestep (0.9.1 and later; ComfyUI's defaults for a checkpoint
without its config: 0.9.1's for 1024-wide decoders without the encoder's `down_blocks.1.conv` bias, 0.9.5's with it)
mixes noise drawn over the whole latent into it first: `prepare` draws it on the host by the stock's call, the bands
decode the mixed latent (a tiled decode: each tile's, in the stock's order). 0.9.1's decoder also adds noise inside
its first blocks' resnets (`inject_noise`), drawn at the shape of each call's input: a band's rows, and frame chunks
sized by its own bytes (v0.24), so no band can draw the whole's (nor a worker decoding a whole tile the host's);
that decode is refused (`decode_refusal`) and takes the stock path. 0.9.5's defaults have no `inject_noise`; a
checkpoint whose metadata carries its config decides for itself: the refusal reads the built modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class VaeFamily:
    name: str  # "vae:<host>_<class>", the family the workers hold it under
    classes: tuple[str, ...]  # the VAE's class names, with their module's prefix
    decode: Callable  # (the VAE, a latent's rows) -> the image's rows
    encode: Callable  # (the VAE, an image's rows) -> the latent's rows (diffusers: the distribution's parameters)
    latent_patch: Callable = None  # the VAE -> image rows it folds into one by reshapes, not strided convolutions
    # (a patchify before the encoder, a pixel-unshuffle, a batch-normed latent's patches; None: 1)
    takes_timestep: bool = False  # decode(vae, latent, timestep=...) for a decoder conditioned on the timestep
    video: bool = False  # ComfyUI's: a latent of (batch, channels, frames, rows, columns), the image its frames
    decode_refusal: Callable = None  # the VAE -> why its decode cannot leave the host, in bands or whole tiles (one
    # sentence), or None
    equal_bands: bool = False  # it sizes its work by the band's shape: every band must have the same rows
    accepts: Callable = None  # the VAE -> whether this family's split fits it (None: every VAE of its classes)
    prepare: Callable = None  # (the VAE, the whole latent or a tiled decode's tile) -> the latent its bands or a
    # worker decode, run on the host (LTX-Video's noise, drawn over it as the stock decode draws it); None: as it is

    def scale(self, vae) -> int:
        """Image rows per latent row: an encoder's bands start at multiples of it."""
        from .vae_bands import row_scale

        return row_scale(vae) * (1 if self.latent_patch is None else self.latent_patch(vae))


def _diffusers_decode(vae, latent):
    return vae.decode(latent).sample


def _diffusers_encode(vae, image):
    return vae.encode(image).latent_dist.parameters  # mean and log-variance: the host samples (a generator's noise)


def _wan_patch(vae) -> int:
    """Wan 2.2's VAE patchifies 2x2 pixels into channels before its encoder (`patch_size`); Wan 2.1's does not."""
    return vae.config.patch_size or 1


def _ltx_patch(vae) -> int:
    """LTX-Video's encoder patchifies `patch_size` rows into channels, and its downsamplers of type 'spatial' or
    'spatiotemporal' (0.9.5's LTXVideoDownsampler3d) fold their row stride into channels after a convolution of
    stride 1 (its 'conv' downsamples are strided convolutions, counted by vae_bands.row_scale)."""
    patch = vae.config.patch_size
    for module in vae.encoder.modules():
        if type(module).__name__ == "LTXVideoDownsampler3d":
            patch *= module.stride[1]
    return patch


def _ltx_decode(vae, latent, timestep=None):
    """LTX-Video 0.9.1 and later condition the decoder on the timestep (`decode(z, temb)`): per sample, so each
    band takes the whole value."""
    return vae.decode(latent, timestep).sample


def _comfy_latent_patch(vae) -> int:
    return vae.ps[0] if getattr(vae, "bn", None) is not None else 1


def _comfy_ltx_patch(vae) -> int:
    """ComfyUI's LTX-Video encoder patchifies `patch_size` rows into channels, and its space-to-depth downsamples
    fold their row stride into channels after a convolution of stride 1."""
    patch = vae.encoder.patch_size
    for module in vae.encoder.modules():
        if type(module).__name__ == "SpaceToDepthDownsample":
            patch *= module.stride[1]
    return patch


def _ltx_setting(vae, attribute: str, argument: str):
    """A timestep-conditioned decode's setting: ComfyUI v0.24 keeps it on the VAE (`decode_noise_scale`,
    `decode_timestep`), v0.8 as its decode's default argument (`noise_scale`, `timestep`)."""
    if hasattr(vae, attribute):
        return getattr(vae, attribute)
    import inspect

    return inspect.signature(vae.decode).parameters[argument].default


def _comfy_ltx_mix(vae, latent):
    """Host side: ComfyUI's timestep-conditioned LTX-Video decode first mixes noise drawn over the whole latent into
    it (the global generator, unseeded): drawn here by the same call on the latent as the stock decode gets it (its
    device and dtype), so a seeded run draws the same noise and leaves the generator where the stock leaves it."""
    if not vae.timestep_conditioning:
        return latent
    import torch

    scale = _ltx_setting(vae, "decode_noise_scale", "noise_scale")
    return torch.randn_like(latent) * scale + (1.0 - scale) * latent


def _comfy_ltx_decode(vae, latent):
    """A band of ComfyUI's LTX-Video decode: a timestep-conditioned decoder's latent comes mixed (`_comfy_ltx_mix`):
    the decoder runs on it with the decode's timestep (per sample: each band takes the whole value)."""
    if not vae.timestep_conditioning:
        return vae.decode(latent)
    timestep = _ltx_setting(vae, "decode_timestep", "timestep")
    return vae.decoder(vae.per_channel_statistics.un_normalize(latent), timestep=timestep)


def _comfy_ltx_noise(vae) -> str | None:
    """LTX-Video 0.9.1's decoder (`inject_noise` in its first blocks) adds noise drawn at each call's own shape:
    a band's draws are not the whole's (their shape, and frame chunks sized by the band's bytes, differ), and a
    whole tile's, drawn by a worker, come from the worker's generator, not the host's."""
    if any(getattr(m, "inject_noise", False) for m in vae.decoder.modules()):
        return ("ComfyUI's LTX-Video VAE adds noise drawn at each block's own shape inside its decoder "
                "(inject_noise, LTX-Video 0.9.1's): no worker can draw the noise the stock decode draws there")
    return None


def _convolutions_3d(vae) -> set[str]:
    """The kinds of ComfyUI's 3D convolutions an AutoencoderKL holds: built with `conv3d` (HunyuanVideo 1.0's),
    CarriedConv3d, or VideoConv3d where it has attention blocks outside its mid block."""
    return {type(m).__name__ for m in vae.modules()} & {"CarriedConv3d", "VideoConv3d"}


def _flat(vae) -> bool:
    """An image VAE: 2D convolutions only."""
    return not _convolutions_3d(vae)


def _carried(vae) -> bool:
    """HunyuanVideo 1.0's: 3D convolutions padded by their caller, and none that pad themselves."""
    return _convolutions_3d(vae) == {"CarriedConv3d"}


HUNYUAN_ENCODERS = {"comfy.ldm.hunyuan_video.vae_refiner.Encoder": "DnSmpl",  # 1.5's, HunyuanImage 2.1 refiner's
                    "comfy.ldm.hunyuan_video.vae.Encoder": "PixelShuffle2D"}  # HunyuanImage 2.1's
# each encoder's downsample: a convolution of stride 1, then 2x2 pixels folded into channels


def _hunyuan_encoder(vae) -> str:
    encoder = getattr(vae, "encoder", None)
    return f"{type(encoder).__module__}.{type(encoder).__qualname__}"


def _hunyuan_patch(vae) -> int:
    """Image rows per latent row of ComfyUI's HunyuanVideo 1.5 or HunyuanImage 2.1 VAE: its encoder's downsamples
    fold 2 rows into channels each."""
    downsample = HUNYUAN_ENCODERS[_hunyuan_encoder(vae)]
    return 2 ** sum(type(m).__name__ == downsample for m in vae.encoder.modules())


def _hunyuan_video(vae) -> bool:
    """1.5's encoder and decoder (`vae_refiner.py`, also HunyuanImage 2.1's refiner's): a latent of frames (one
    frame per image for the refiner)."""
    return _hunyuan_encoder(vae) == "comfy.ldm.hunyuan_video.vae_refiner.Encoder"


def _hunyuan_image(vae) -> bool:
    """HunyuanImage 2.1's encoder and decoder (`hunyuan_video/vae.py`): 2D, a latent of rows and columns."""
    return _hunyuan_encoder(vae) == "comfy.ldm.hunyuan_video.vae.Encoder"


def _comfy_decode(vae, latent):
    return vae.decode(latent)


def _comfy_encode(vae, image):
    return vae.encode(image)


FAMILIES = (
    VaeFamily("vae:diffusers_autoencoderkl", ("diffusers.models.autoencoders.autoencoder_kl.AutoencoderKL",),
              _diffusers_decode, _diffusers_encode),
    # Wan 2.1's causal video VAE, and Wan 2.2's (the same class with is_residual and patch_size 2)
    VaeFamily("vae:diffusers_autoencoderkl_wan", ("diffusers.models.autoencoders.autoencoder_kl_wan.AutoencoderKLWan",),
              _diffusers_decode, _diffusers_encode, latent_patch=_wan_patch),
    # HunyuanVideo's causal video VAE (replicate-padded 3D convolutions, the whole mid block on gathered rows) and
    # LTX-Video's (strided downsamples, pixel-shuffle upsamples)
    VaeFamily("vae:diffusers_autoencoderkl_hunyuan_video",
              ("diffusers.models.autoencoders.autoencoder_kl_hunyuan_video.AutoencoderKLHunyuanVideo",),
              _diffusers_decode, _diffusers_encode),
    VaeFamily("vae:diffusers_autoencoderkl_ltx_video",
              ("diffusers.models.autoencoders.autoencoder_kl_ltx.AutoencoderKLLTXVideo",), _ltx_decode,
              _diffusers_encode, latent_patch=_ltx_patch, takes_timestep=True),
    # Qwen-Image's (Wan 2.1's architecture) and Flux.2's (an AutoencoderKL with 32 latent channels)
    VaeFamily("vae:diffusers_autoencoderkl_qwenimage",
              ("diffusers.models.autoencoders.autoencoder_kl_qwenimage.AutoencoderKLQwenImage",),
              _diffusers_decode, _diffusers_encode),
    VaeFamily("vae:diffusers_autoencoderkl_flux2", ("diffusers.models.autoencoders.autoencoder_kl_flux2.AutoencoderKLFlux2",),
              _diffusers_decode, _diffusers_encode),
    # ComfyUI's SD1.x / SDXL / SD3 / Flux / Flux.2 VAE (comfy.sd.VAE's first_stage_model); Flux.2's folds 2x2
    # latent positions into its channels after a batch norm (`bn`, `ps`)
    VaeFamily("vae:comfy_autoencoderkl", ("comfy.ldm.models.autoencoder.AutoencoderKL",),
              _comfy_decode, _comfy_encode, latent_patch=_comfy_latent_patch, accepts=_flat),
    # ComfyUI's HunyuanVideo 1.0 VAE: the same class of CarriedConv3d (replicate padding and the chunk before's
    # frames, added by their caller), strided downsamples, the mid block's attention whole on gathered rows
    VaeFamily("vae:comfy_hunyuan_video", ("comfy.ldm.models.autoencoder.AutoencoderKL",), _comfy_decode,
              _comfy_encode, video=True, accepts=_carried),
    # ComfyUI's HunyuanVideo 1.5 VAE (CarriedConv3d, RMS norms, downsamples that fold 2x2 pixels into channels;
    # HunyuanImage 2.1's refiner is the same coders of plain 3D convolutions and GroupNorms, one frame per image)
    # and HunyuanImage 2.1's VAE (2D, 32 pixels per latent row)
    VaeFamily("vae:comfy_hunyuan_video15", ("comfy.ldm.models.autoencoder.AutoencodingEngine",), _comfy_decode,
              _comfy_encode, latent_patch=_hunyuan_patch, video=True, accepts=_hunyuan_video),
    VaeFamily("vae:comfy_hunyuan_image21", ("comfy.ldm.models.autoencoder.AutoencodingEngine",), _comfy_decode,
              _comfy_encode, latent_patch=_hunyuan_patch, accepts=_hunyuan_image),
    # ComfyUI's Wan 2.1 video VAE (Qwen-Image's too), and Wan 2.2's (it patchifies 2x2 pixels into channels
    # before its encoder)
    VaeFamily("vae:comfy_wan", ("comfy.ldm.wan.vae.WanVAE",), _comfy_decode, _comfy_encode, video=True),
    VaeFamily("vae:comfy_wan22", ("comfy.ldm.wan.vae2_2.WanVAE",), _comfy_decode, _comfy_encode,
              latent_patch=lambda vae: 2, video=True),
    # ComfyUI's LTX-Video VAE: its encoder and decoder cut the frames into chunks sized by a frame's bytes (the
    # band's: every band must cut alike); the timestep-conditioned decoder of 0.9.1 and later mixes noise over the
    # whole latent on the host first; 0.9.1's noise inside its resnet blocks is refused
    VaeFamily("vae:comfy_ltx_video", ("comfy.ldm.lightricks.vae.causal_video_autoencoder.VideoVAE",),
              _comfy_ltx_decode, _comfy_encode, latent_patch=_comfy_ltx_patch, video=True,
              decode_refusal=_comfy_ltx_noise, equal_bands=True, prepare=_comfy_ltx_mix),
)


def family_of(vae) -> VaeFamily | None:
    """The family `vae` belongs to (by its class, exactly: a subclass may decode otherwise), or None."""
    name = f"{type(vae).__module__}.{type(vae).__qualname__}"
    return next((family for family in FAMILIES if name in family.classes
                 and (family.accepts is None or family.accepts(vae))), None)


def family_named(name: str) -> VaeFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"no VAE family {name!r}")
