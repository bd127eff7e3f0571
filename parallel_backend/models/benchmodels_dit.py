"""The bench's narrow diffusers transformers: `flux-small` (FluxTransformer2DModel) and `wan-small`
(WanTransformer3DModel), with their real block structure and token counts at a fraction of the width.

Both sample with flow-matching Euler (diffusers' FlowMatchEulerDiscreteScheduler, static shift 3.0: SD3's,
and Wan's at 480p) and take a timestep per row; their latents tile in 16-pixel steps (8x VAE, 2x2 patches).

The text encoders' widths are scaled down with the transformers: Flux.1 projects T5's 4096-wide tokens into
its 3072-wide stream, and that projection is ~0.2% of a call. At width 512 a 4096-wide text input would
be ~10% of the text tokens' compute and 4 MiB of context per row per call (16x the latents) crossing to the
workers; a 512-wide text input (as wide as the stream) keeps the projection near 1% and the context at the
latents' scale. The pooled (CLIP) input shrinks in proportion, 768 -> 128. Wan's umT5 input gets the same 512.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime import validation
from .bench_names import check_still_images
from .benchmodels_base import MAX_FRAMES, BenchModel
from .diffusers_dit import family_named

FLOW_SHIFT = 3.0
FLUX_TEXT_TOKENS = 256  # Flux.1-schnell's T5 length
WAN_TEXT_TOKENS = 512  # Wan's umT5 length
WAN_FRAMES_PER_LATENT = 4  # Wan's VAE keeps the first frame and packs every further 4 into one latent frame

# 2 double-stream + 4 single-stream blocks, 8 heads of 64; 2x2-packed 16-channel latents (64 per token);
# RoPE axes (time, row, column) in Flux.1's proportions (16, 56, 56 of 128), halved to the head width.
FLUX_SMALL = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
                  num_attention_heads=8, joint_attention_dim=512, pooled_projection_dim=128, guidance_embeds=False,
                  axes_dims_rope=(8, 28, 28))
# 4 blocks, 8 heads of 64, feed-forward 4x wide; 16-channel latents in (1, 2, 2) patches.
WAN_SMALL = dict(num_layers=4, num_attention_heads=8, attention_head_dim=64, in_channels=16, out_channels=16,
                 text_dim=512, ffn_dim=2048, patch_size=(1, 2, 2))


@dataclass
class TransformerBenchModel(BenchModel):
    """A diffusers transformer: flow-matching Euler, a timestep per row, the family's shared inputs kept whole."""

    @property
    def shared(self) -> frozenset:
        return family_named(self.family).shared

    def timestep(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        return t.reshape(()).expand(rows)

    def make_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)

    def tokens(self, resolution: tuple[int, int]) -> int:
        """Image (or video) tokens per row."""
        side = self.latent_factor * self.patch
        return (resolution[0] // side) * (resolution[1] // side) * self.latent_frames()

    def latent_frames(self) -> int:
        return 1

    def sequence_sizes(self, resolution: tuple[int, int]) -> tuple[int, int]:
        """(tokens one split attention mixes per row, such attentions per call): what a sequence split exchanges."""
        raise NotImplementedError


@dataclass
class FluxBenchModel(TransformerBenchModel):
    """Latents packed as Flux's pipeline packs them: (B, tokens, 64), 2x2 patches of 16 channels in a row."""

    def latent_shape(self, images: int, resolution: tuple[int, int]) -> tuple[int, ...]:
        return (images, self.tokens(resolution), self.module.config.in_channels)

    def extras(self, rows: int, resolution: tuple[int, int] | None = None) -> dict:
        """pooled_projections (rows, 128) per row; img_ids (tokens, 3) and txt_ids (256, 3) shared."""
        h, w = (r // (self.latent_factor * self.patch) for r in resolution or (self.default_resolution,) * 2)
        img_ids = torch.zeros(h, w, 3)
        img_ids[..., 1] = torch.arange(h)[:, None]
        img_ids[..., 2] = torch.arange(w)[None, :]
        dtype = next(self.module.parameters()).dtype
        pooled = torch.randn(rows, self.module.config.pooled_projection_dim, generator=torch.Generator().manual_seed(7))
        return {"pooled_projections": pooled.to(dtype), "img_ids": img_ids.reshape(h * w, 3),
                "txt_ids": torch.zeros(self.context_shape[0], 3)}

    def timestep(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        return super().timestep(t, rows) / 1000  # Flux's pipeline passes sigmas; the model scales them by 1000

    def sequence_sizes(self, resolution: tuple[int, int]) -> tuple[int, int]:
        """Image and text tokens attend jointly in every double- and single-stream block."""
        blocks = len(self.module.transformer_blocks) + len(self.module.single_transformer_blocks)
        return self.tokens(resolution) + self.context_shape[0], blocks

    def feature_elements(self, resolution: tuple[int, int]) -> int:
        width = self.module.config.num_attention_heads * self.module.config.attention_head_dim
        return (self.tokens(resolution) + self.context_shape[0]) * 4 * width  # the MLP's hidden tokens


@dataclass
class WanBenchModel(TransformerBenchModel):
    """Video latents (B, 16, latent frames, H/8, W/8); `frames` pixel frames per clip, 4k + 1."""

    def latent_frames(self) -> int:
        return (self.frames - 1) // WAN_FRAMES_PER_LATENT + 1

    def latent_shape(self, images: int, resolution: tuple[int, int]) -> tuple[int, ...]:
        h, w = (r // self.latent_factor for r in resolution)
        return (images, self.module.config.in_channels, self.latent_frames(), h, w)

    def sequence_sizes(self, resolution: tuple[int, int]) -> tuple[int, int]:
        """The video tokens' self-attention in every block (cross-attention to the text attends locally)."""
        return self.tokens(resolution), len(self.module.blocks)

    def feature_elements(self, resolution: tuple[int, int]) -> int:
        return self.tokens(resolution) * self.module.config.ffn_dim


def _build(cls, config: dict, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    module = cls(**config).eval().requires_grad_(False)
    return module if dtype == torch.float32 else module.to(dtype)


def wan_frames(name: str, frames: int) -> int:
    """`frames` if Wan's VAE takes clips of that length: 4k + 1 frames."""
    frames = validation.whole_number("frames", frames, 1, MAX_FRAMES)
    if (frames - 1) % WAN_FRAMES_PER_LATENT:
        raise ValueError(f"frames {frames}: model {name} needs 4k + 1 frames (1, 5, 9, ..., 17, ...), as Wan's VAE "
                         "keeps the first frame and packs every further 4 into one latent frame")
    return frames


def flux_small(dtype: torch.dtype = torch.float32, frames: int | None = None) -> FluxBenchModel:
    """512x512 px -> 64x64 latents -> 1024 image tokens, plus 256 text tokens of width 512."""
    from diffusers import FluxTransformer2DModel

    check_still_images("flux-small", frames)

    return FluxBenchModel("flux-small", _build(FluxTransformer2DModel, FLUX_SMALL, dtype), (FLUX_TEXT_TOKENS, 512),
                          latent_factor=8, default_resolution=512, family="diffusers_dit:flux", patch=2)


def wan_small(dtype: torch.dtype = torch.float32, frames: int | None = None) -> WanBenchModel:
    """17 frames (by default) at 192x320 px (H x W) -> latents 5 x 24 x 40 -> 1200 tokens, plus 512 text tokens
    of width 512."""
    from diffusers import WanTransformer3DModel

    frames = wan_frames("wan-small", 17 if frames is None else frames)

    return WanBenchModel("wan-small", _build(WanTransformer3DModel, WAN_SMALL, dtype), (WAN_TEXT_TOKENS, 512),
                         latent_factor=8, default_resolution="192x320", family="diffusers_dit:wan", patch=2,
                         frames=frames)


TRANSFORMERS = {"flux-small": flux_small, "wan-small": wan_small}
