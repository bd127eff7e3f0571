"""The bench models' VAEs (`tandem bench --stage vae`): diffusers' AutoencoderKL at the real models' channel
widths (128, 256, 512, 512; two resnets per block; 32 norm groups), seeded, nothing downloaded: 4 latent
channels for the SD-shaped models, 16 for flux-small. wan-small's video VAE (causal 3D convolutions) has no
band split yet (issue 29)."""

from __future__ import annotations

import torch

LATENT_CHANNELS = {"tiny": 4, "small": 4, "sd15": 4, "sdxl": 4, "flux-small": 16}
DEFAULT_RESOLUTION = {"tiny": 64, "small": 128, "sd15": 512, "sdxl": 1024, "flux-small": 512}
SCALE = 8  # pixels per latent row and column


def build_bench_vae(name: str, dtype: torch.dtype = torch.float32):
    """The seeded VAE of bench model `name` (ValueError, one sentence, for a model without one)."""
    from diffusers import AutoencoderKL

    if name not in LATENT_CHANNELS:
        raise ValueError(f"bench model {name!r} has no VAE to split yet: choose one of "
                         f"{', '.join(LATENT_CHANNELS)}")
    narrow = name in ("tiny", "small")  # the test-sized models: a narrow VAE of the same shape
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32, 32, 64, 64) if narrow else (128, 256, 512, 512),
                        layers_per_block=1 if narrow else 2, latent_channels=LATENT_CHANNELS[name],
                        norm_num_groups=8 if narrow else 32)
    return (vae if dtype == torch.float32 else vae.to(dtype)).eval().requires_grad_(False)


def bench_latent(name: str, resolution: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A seeded latent of one image at `resolution` (pixels, H x W) for bench model `name`'s VAE."""
    h, w = resolution
    if h % SCALE or w % SCALE:
        raise ValueError(f"a VAE's resolution must be a multiple of {SCALE} pixels; got {h}x{w}")
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, LATENT_CHANNELS[name], h // SCALE, w // SCALE, generator=generator).to(dtype)
