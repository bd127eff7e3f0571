"""The bench models' VAEs (`tandem bench --stage vae`): diffusers' AutoencoderKL at the real models' channel
widths (128, 256, 512, 512; two resnets per block; 32 norm groups), seeded, nothing downloaded: 4 latent
channels for the SD-shaped models, 16 for flux-small; for wan-small, diffusers' Wan 2.1 video VAE at its own
widths (96 to 384 channels, 16 latent channels, causal 3D convolutions), 17 frames by default."""

from __future__ import annotations

LATENT_CHANNELS = {"tiny": 4, "small": 4, "sd15": 4, "sdxl": 4, "flux-small": 16, "wan-small": 16}
DEFAULT_RESOLUTION = {"tiny": 64, "small": 128, "sd15": 512, "sdxl": 1024, "flux-small": 512,
                      "wan-small": "192x320"}
VIDEO_FRAMES = {"wan-small": 17}  # frames of a clip: 1 + 4k (the Wan VAE's latent has 1 + k frames)
SCALE = 8  # pixels per latent row and column


def check_vae_bench(name: str, resolution: tuple[int, int] | None, stage: str = "vae") -> None:
    """Raises ValueError in one sentence for a bench model without a VAE or a resolution its VAE cannot take
    (no torch imported: the CLI checks this first); `stage`: the bench's --stage the sentence names."""
    if name not in LATENT_CHANNELS:
        raise ValueError(f"--stage {stage}: bench model {name!r} has no VAE to split yet: choose one of "
                         f"{', '.join(LATENT_CHANNELS)}")
    if resolution is not None and (resolution[0] % SCALE or resolution[1] % SCALE):
        raise ValueError(f"--stage {stage}: a VAE's resolution must be a multiple of {SCALE} pixels; got "
                         f"{resolution[0]}x{resolution[1]}")


def build_bench_vae(name: str, dtype=None):
    """The seeded VAE of bench model `name` (ValueError, one sentence, for a model without one)."""
    import torch
    from diffusers import AutoencoderKL

    check_vae_bench(name, None)
    dtype = dtype or torch.float32
    if name in VIDEO_FRAMES:
        vae = _seeded_wan_vae()
        return (vae if dtype == torch.float32 else vae.to(dtype)).eval().requires_grad_(False)
    narrow = name in ("tiny", "small")  # the test-sized models: a narrow VAE of the same shape
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32, 32, 64, 64) if narrow else (128, 256, 512, 512),
                        layers_per_block=1 if narrow else 2, latent_channels=LATENT_CHANNELS[name],
                        norm_num_groups=8 if narrow else 32)
    return (vae if dtype == torch.float32 else vae.to(dtype)).eval().requires_grad_(False)


def bench_latent(name: str, resolution: tuple[int, int], dtype=None, frames: int | None = None):
    """A seeded latent of one image at `resolution` (pixels, H x W) for bench model `name`'s VAE; a video
    model's of a clip of `frames` frames (1 + 4k; default VIDEO_FRAMES)."""
    import torch

    check_vae_bench(name, resolution)
    h, w = resolution
    dtype = dtype or torch.float32
    generator = torch.Generator().manual_seed(0)
    clip = () if name not in VIDEO_FRAMES else (1 + ((frames or VIDEO_FRAMES[name]) - 1) // 4,)
    return torch.randn(1, LATENT_CHANNELS[name], *clip, h // SCALE, w // SCALE, generator=generator).to(dtype)


def bench_image(name: str, resolution: tuple[int, int], dtype=None, frames: int | None = None):
    """A seeded image in [-1, 1] (what a VAE encodes) at `resolution` for bench model `name`'s VAE; a video
    model's a clip of `frames` frames (1 + 4k; default VIDEO_FRAMES)."""
    import torch

    check_vae_bench(name, resolution, "encode")
    clip = () if name not in VIDEO_FRAMES else (frames or VIDEO_FRAMES[name],)
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(1, 3, *clip, *resolution, generator=generator) * 2 - 1).to(dtype or torch.float32)


def _seeded_wan_vae():
    """Wan 2.1's VAE (diffusers' defaults are its widths), seeded (`seed_wan_weights`)."""
    from diffusers import AutoencoderKLWan

    return seed_wan_weights(AutoencoderKLWan())


def seed_wan_weights(vae, seed: int = 0):
    """Seeds a Wan VAE's weights at a scale that keeps the decoded video inside the clamp of [-1, 1] (diffusers'
    own initialisation saturates it: every output equal). Returns `vae`."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=generator) * (0.5 / p[0].numel()) ** 0.5)
            else:
                p.copy_((1.0 if name.endswith(("gamma", "weight")) else 0.0) + 0.1 * torch.randn(p.shape,
                                                                                                generator=generator))
    return vae
