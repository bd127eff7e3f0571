"""A diffusers pipeline's VAE, decoding and encoding in bands of rows on the pool (engine/vae.py): what
`parallelize` puts in place of an AutoencoderKL it can split. Tiling or slicing turned on by the user keeps the
VAE's own decode (said once)."""

from __future__ import annotations

import logging

from ..engine import vae as bands
from ..models import vae_bands, vae_families
from .stand_in import StandIn

log = logging.getLogger("tandem")


def splits(vae) -> bool:
    """Whether `parallelize` can put a ParallelVAE in place of `vae`: its family is listed and every layer bands
    exactly (a layer that cannot keeps the VAE's own decode, said once with the layer's name)."""
    if vae is None or vae_families.family_of(vae) is None:
        return False
    try:
        vae_bands.check_layers(vae)
        vae_bands.check_noise(vae)  # it would split the encode, but keeps the VAE whole for both
    except ValueError as exc:
        log.info("Tandem: the VAE decodes on the host: %s", exc)
        return False
    return True


class ParallelVAE(StandIn):
    inner = "vae"

    def _own_path(self) -> bool:
        """Tiling or slicing on: the VAE's own decode (bands of a tile gain nothing), said once."""
        own = bool(getattr(self.real, "use_tiling", False) or getattr(self.real, "use_slicing", False))
        if own and not self.__dict__.get("_said"):
            self.__dict__["_said"] = True
            log.info("Tandem: the VAE decodes on the host: its tiling or slicing is on (bands replace both)")
        return own

    def decode(self, z, *args, **kwargs):
        """The real VAE's decode, its arguments as its own signature reads them (LTX-Video's takes the timestep
        second: `decode(z, temb, return_dict)`, passed on to the bands); any other the bands do not pass on keeps
        the VAE's own decode."""
        import inspect

        given = inspect.signature(self.real.decode).bind(z, *args, **kwargs).arguments
        unpassed = [name for name, value in given.items() if name not in ("z", "return_dict", "generator", "temb")
                    and value is not None and not (isinstance(value, dict) and not value)]
        if self._own_path() or unpassed:
            return self.real.decode(z, *args, **kwargs)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return_dict = given.get("return_dict", True)
        sample = bands.decode(self._executor.engine, self.real, z, timestep=given.get("temb")).out.to(z.dtype)
        self.calls += 1
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def encode(self, x, return_dict: bool = True):
        if self._own_path():
            return self.real.encode(x, return_dict=return_dict)
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        moments = bands.encode(self._executor.engine, self.real, x).out.to(x.dtype)
        self.calls += 1
        distribution = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=distribution) if return_dict else (distribution,)

    def forward(self, *args, **kwargs):
        return self.real(*args, **kwargs)
