"""The models `tandem bench` runs: the embedded digits UNet, SD-shaped diffusers UNets and narrow diffusers
transformers (flux-small, wan-small in benchmodels_dit.py), all with seeded random weights.

Cost does not depend on the weights, so everything but `tiny` is built from its architecture with seeded
random weights (nothing is downloaded). What a bench model says about its inputs is BenchModel's
(benchmodels_base.py); this module is the catalogue: the UNets' configurations and `build_bench_model`.
"""

from __future__ import annotations

import torch

from .bench_names import check_bench_model_name, check_still_images
from .benchmodels_base import BenchModel, no_extras
from .benchmodels_dit import TRANSFORMERS

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


def _sdxl_extras(rows: int, width: int = 1280, size: float = 1024.0) -> dict:
    generator = torch.Generator().manual_seed(7)
    return {"added_cond_kwargs": {"text_embeds": torch.randn(rows, width, generator=generator),
                                  "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]]).repeat(rows, 1)}}


def _sdxl_narrow_extras(rows: int) -> dict:
    return _sdxl_extras(rows, width=32, size=128.0)


UNETS = {"small": (SMALL_UNET, (77, 256), 256, no_extras), "sd15": (SD15_UNET, (77, 768), 512, no_extras),
         "sdxl": (SDXL_UNET, (77, 2048), 1024, _sdxl_extras),
         "sd15-narrow": (SD15_NARROW_UNET, (77, 32), 128, no_extras),
         "sdxl-narrow": (SDXL_NARROW_UNET, (77, 32), 128, _sdxl_narrow_extras)}


def build_bench_model(name: str, dtype: torch.dtype = torch.float32, frames: int | None = None) -> BenchModel:
    """name: tiny | small | sd15 | sdxl | sd15-narrow | sdxl-narrow | flux-small | wan-small.
    frames: frames per clip, for video models only (None: the model's default); checked before anything is built."""
    check_bench_model_name(name)
    if name in TRANSFORMERS:
        return TRANSFORMERS[name](dtype, frames)
    check_still_images(name, frames)
    if name == "tiny":
        from ..tiny.model import TinyDigitsModel

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
