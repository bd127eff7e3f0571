"""What every bench model is. A BenchModel says how a denoiser's inputs are made for a resolution (and a clip
length, for video models): the latents' shape, the text tokens, the extra inputs per row and shared, the
timestep the model takes, the scheduler the bench samples with, and a lower bound of the memory a job holds.

The UNets (benchmodels.py) are BenchModels and the transformers (benchmodels_dit.py) subclass it; the
catalogue in benchmodels.py imports the transformers, so what both share sits here, below both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..runtime import validation
from ..runtime.calls import ModelCall

MAX_FRAMES = 4097  # frames of a bench clip; memory bounds it further


def no_extras(rows: int) -> dict:
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
    row_inputs: Callable[[int], dict] = no_extras  # rows -> extra keyword inputs (SDXL's pooled text, size ids)
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
        from ..tiny.model import SCHEDULER_CONFIG

        return make_scheduler("ddim", SCHEDULER_CONFIG)

    def call(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, resolution: tuple[int, int],
             **fields) -> ModelCall:
        """The ModelCall of one denoiser evaluation on latents `x` (B, ...) with text `context` (B, L, D)."""
        rows = x.shape[0]
        return ModelCall(x, self.timestep(t, rows), context, self.extras(rows, resolution), shared=self.shared,
                         **fields)
