"""The models `tandem bench` runs: the embedded digits UNet, SD-shaped diffusers UNets and narrow diffusers
transformers (flux-small, wan-small in benchmodels_dit.py), all with seeded random weights.

Cost does not depend on the weights, so everything but `tiny` is built from its architecture with seeded
random weights (nothing is downloaded). A BenchModel says how its inputs are made for a resolution (and a
clip length, for video models): the latents' shape, the text tokens, the extra inputs per row and shared,
the timestep the model takes, the scheduler the bench samples with, and a lower bound of the memory a job holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from . import validation
from .calls import ModelCall

SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
SMALL_UNET = dict(block_out_channels=(64, 128, 256), layers_per_block=1, cross_attention_dim=256, attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


# SD1.5's and SDXL's block structure (levels, layers per level, where cross-attention sits, SDXL's extra
# embeddings), narrow enough for tests: the real skip pattern at a fraction of the cost.
SD15_NARROW_UNET = dict(SD15_UNET, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, norm_num_groups=8)
SDXL_NARROW_UNET = dict(SDXL_UNET, block_out_channels=(32, 64, 64), cross_attention_dim=32, norm_num_groups=8,
                        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4),
                        addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32)

MAX_FRAMES = 4097  # frames of a bench clip; memory bounds it further


def _no_extras(rows: int) -> dict:
    return {}


@dataclass
class BenchModel:
    """A UNet denoiser (diffusers' UNet2DConditionModel or the digits UNet): latents (B, C, H/f, W/f), the
    sampler's scalar timestep, DDIM. Subclasses (benchmodels_dit.py) change how the inputs are made."""

    name: str
    module: torch.nn.Module
    context_shape: tuple[int, int]  # (tokens, width)
    latent_factor: int  # pixels per latent, per side
    default_resolution: int | str  # pixels: 256 or "192x320" (H x W)
    row_inputs: Callable[[int], dict] = _no_extras  # rows -> extra keyword inputs (SDXL's pooled text, size ids)
    family: str = "diffusers_unet"  # how the engine and the workers call it (models.forward_for_family)
    patch: int = 1  # latent pixels per token, per side: a resolution is a multiple of latent_factor * patch
    frames: int | None = None  # frames per clip (video models); None: an image model

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser, under the name the UNet tests use."""
        return self.module

    @property
    def shared(self) -> frozenset:
        """Names of extra inputs every row share gets whole (ModelCall.shared)."""
        return frozenset()

    def check_resolution(self, resolution: tuple[int, int]) -> None:
        """Refuses a resolution (H, W) in pixels that the latents (and patches) do not tile exactly."""
        multiple = self.latent_factor * self.patch
        if resolution[0] % multiple or resolution[1] % multiple:
            raise ValueError(f"resolution {resolution[0]}x{resolution[1]}: model {self.name} needs multiples of "
                             f"{multiple} pixels per side")

    def latent_shape(self, images: int, resolution: tuple[int, int]) -> tuple[int, ...]:
        h, w = (r // self.latent_factor for r in resolution)
        return (images, self.module.config.in_channels, h, w)

    def extras(self, rows: int, resolution: tuple[int, int] | None = None) -> dict:
        """The model's extra keyword inputs for `rows` rows at `resolution` (pixels, H x W)."""
        return self.row_inputs(rows)

    def timestep(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """The model's timestep input for the sampler's timestep `t`."""
        return t

    def feature_elements(self, resolution: tuple[int, int]) -> int:
        """Elements of one row's widest feature map."""
        h, w = (r // self.latent_factor for r in resolution)
        return self.module.config.block_out_channels[0] * h * w

    def memory_bytes(self, rows: int, resolution: tuple[int, int]) -> int:
        """A lower bound of the memory a sampler loop over `rows` rows holds (validation.sampling_bytes)."""
        itemsize = next(self.module.parameters()).element_size()
        return validation.sampling_bytes(rows, math.prod(self.latent_shape(1, resolution)),
                                         self.feature_elements(resolution), itemsize)

    def make_scheduler(self):
        from .sampling import make_scheduler
        from .tiny.model import SCHEDULER_CONFIG

        return make_scheduler("ddim", SCHEDULER_CONFIG)

    def call(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, resolution: tuple[int, int],
             **fields) -> ModelCall:
        """The ModelCall of one denoiser evaluation on latents `x` (B, ...) with text `context` (B, L, D)."""
        rows = x.shape[0]
        return ModelCall(x, self.timestep(t, rows), context, self.extras(rows, resolution), shared=self.shared,
                         **fields)


def _sdxl_extras(rows: int, width: int = 1280, size: float = 1024.0) -> dict:
    generator = torch.Generator().manual_seed(7)
    return {"added_cond_kwargs": {"text_embeds": torch.randn(rows, width, generator=generator),
                                  "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]]).repeat(rows, 1)}}


def _sdxl_narrow_extras(rows: int) -> dict:
    return _sdxl_extras(rows, width=32, size=128.0)


UNETS = {"small": (SMALL_UNET, (77, 256), 256, _no_extras), "sd15": (SD15_UNET, (77, 768), 512, _no_extras),
         "sdxl": (SDXL_UNET, (77, 2048), 1024, _sdxl_extras),
         "sd15-narrow": (SD15_NARROW_UNET, (77, 32), 128, _no_extras),
         "sdxl-narrow": (SDXL_NARROW_UNET, (77, 32), 128, _sdxl_narrow_extras)}


def check_still_images(name: str, frames: int | None) -> None:
    """Refuses a clip length for an image model."""
    if frames is not None:
        raise ValueError(f"frames: model {name} makes still images; give --frames only with a video model (wan-small)")


def check_bench_model_name(name: str) -> None:
    """Refuses a name that is no bench model, before anything is built."""
    from .benchmodels_dit import TRANSFORMERS

    if name not in ("tiny", *UNETS, *TRANSFORMERS):
        raise ValueError(f"unknown bench model {name!r}; choose one of: tiny, {', '.join([*UNETS, *TRANSFORMERS])}")


def build_bench_model(name: str, dtype: torch.dtype = torch.float32, frames: int | None = None) -> BenchModel:
    """name: tiny | small | sd15 | sdxl | sd15-narrow | sdxl-narrow | flux-small | wan-small.
    frames: frames per clip, for video models only (None: the model's default); checked before anything is built."""
    from .benchmodels_dit import TRANSFORMERS

    check_bench_model_name(name)
    if name in TRANSFORMERS:
        return TRANSFORMERS[name](dtype, frames)
    check_still_images(name, frames)
    if name == "tiny":
        from .tiny.model import TinyDigitsModel

        model = TinyDigitsModel.load()
        return BenchModel(name, model.unet if dtype == torch.float32 else model.unet.to(dtype), (model.config["text"]["max_length"], model.config["text"]["width"]),
                          model.config["patch"], model.config["pixel_size"])
    from diffusers import UNet2DConditionModel

    config, context, resolution, extras = UNETS[name]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=resolution // 8, **config).eval().requires_grad_(False)
    if dtype != torch.float32:
        unet = unet.to(dtype)
    return BenchModel(name, unet, context, 8, resolution, extras)
