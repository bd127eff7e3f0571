"""The VAEs Tandem can split into bands (models/vae_bands.py, the whole VAE banded): for each, how a latent is
decoded and an image encoded. A VAE not listed here takes its host's stock path (issue 29 lists the families to come:
ComfyUI's classes, Wan's and HunyuanVideo's causal 3D VAEs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class VaeFamily:
    name: str  # "vae:<host>_<class>", the family the workers hold it under
    classes: tuple[str, ...]  # the VAE's class names, with their module's prefix
    decode: Callable  # (the VAE, a latent's rows) -> the image's rows
    encode: Callable  # (the VAE, an image's rows) -> the latent's rows (diffusers: the distribution's parameters)
    latent_patch: Callable = None  # the VAE -> latent rows it folds into one after encoding (None: 1)

    def scale(self, vae) -> int:
        """Image rows per latent row: an encoder's bands start at multiples of it."""
        from .vae_bands import row_scale

        return row_scale(vae) * (1 if self.latent_patch is None else self.latent_patch(vae))


def _diffusers_decode(vae, latent):
    return vae.decode(latent).sample


def _diffusers_encode(vae, image):
    return vae.encode(image).latent_dist.parameters  # mean and log-variance: the host samples (a generator's noise)


def _comfy_latent_patch(vae) -> int:
    return vae.ps[0] if getattr(vae, "bn", None) is not None else 1


def _comfy_decode(vae, latent):
    return vae.decode(latent)


def _comfy_encode(vae, image):
    return vae.encode(image)


FAMILIES = (
    VaeFamily("vae:diffusers_autoencoderkl", ("diffusers.models.autoencoders.autoencoder_kl.AutoencoderKL",),
              _diffusers_decode, _diffusers_encode),
    # Wan 2.1's causal video VAE
    VaeFamily("vae:diffusers_autoencoderkl_wan", ("diffusers.models.autoencoders.autoencoder_kl_wan.AutoencoderKLWan",),
              _diffusers_decode, _diffusers_encode),
    # Qwen-Image's (Wan 2.1's architecture) and Flux.2's (an AutoencoderKL with 32 latent channels)
    VaeFamily("vae:diffusers_autoencoderkl_qwenimage",
              ("diffusers.models.autoencoders.autoencoder_kl_qwenimage.AutoencoderKLQwenImage",),
              _diffusers_decode, _diffusers_encode),
    VaeFamily("vae:diffusers_autoencoderkl_flux2", ("diffusers.models.autoencoders.autoencoder_kl_flux2.AutoencoderKLFlux2",),
              _diffusers_decode, _diffusers_encode),
    # ComfyUI's SD1.x / SDXL / SD3 / Flux / Flux.2 VAE (comfy.sd.VAE's first_stage_model); Flux.2's folds 2x2
    # latent positions into its channels after a batch norm (`bn`, `ps`)
    VaeFamily("vae:comfy_autoencoderkl", ("comfy.ldm.models.autoencoder.AutoencoderKL",),
              _comfy_decode, _comfy_encode, latent_patch=_comfy_latent_patch),
    # ComfyUI's Wan 2.1 video VAE (Qwen-Image's too)
    VaeFamily("vae:comfy_wan", ("comfy.ldm.wan.vae.WanVAE",), _comfy_decode, _comfy_encode),
)


def family_of(vae) -> VaeFamily | None:
    """The family `vae` belongs to (by its class, exactly: a subclass may decode otherwise), or None."""
    name = f"{type(vae).__module__}.{type(vae).__qualname__}"
    return next((family for family in FAMILIES if name in family.classes), None)


def family_named(name: str) -> VaeFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"no VAE family {name!r}")
