"""The full-size models plan/paper.py counts, built on torch's `meta` device from diffusers' own classes and the
published configs (typed in here, each beside its source; nothing is downloaded), with the inputs each model's
pipeline gives it. Shapes only: no weight is allocated and no value computed.

Flux.2-dev and HunyuanVideo are diffusers classes that Tandem's diffusers adapter has no family for (Tandem runs
them through ComfyUI, plan/paper.py `Scenario.runs_as`); they are counted through diffusers' plain keyword call
(models/diffusers_dit.py `forward`, family "diffusers_dit"), with their inputs named here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.benchmodels_dit import TransformerBenchModel

# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
FLUX_DEV_TEXT_TOKENS = 512  # FLUX.1-dev's T5 length (schnell's is 256)
FLUX_DEV_GUIDANCE = 3.5  # the pipeline's default distilled guidance
# Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json (Wan 2.2 A14B: two transformers of this config)
WAN_14B = dict(num_layers=40, num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, patch_size=(1, 2, 2), cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6)
WAN_FRAMES = 81
# Qwen/Qwen-Image transformer/config.json
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
# Its text is the prompt's Qwen2.5-VL tokens less the template's first 34, padded only to the longest prompt of a
# batch: no fixed length. Assumed: 128 (a prompt of about 120 words' tokens; the pipeline's limit is 512).
QWEN_IMAGE_TEXT_TOKENS = 128
# black-forest-labs/FLUX.2-dev transformer/config.json (diffusers' Flux2Transformer2DModel defaults are these)
FLUX2_DEV = dict(patch_size=1, in_channels=128, out_channels=None, num_layers=8, num_single_layers=48,
                 attention_head_dim=128, num_attention_heads=48, joint_attention_dim=15360,
                 timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000,
                 eps=1e-6, guidance_embeds=True)
FLUX2_DEV_TEXT_TOKENS = 512  # Flux2Pipeline pads the Mistral prompt to max_sequence_length, 512
FLUX2_DEV_GUIDANCE = 4.0  # Flux2Pipeline's default (embedded) guidance_scale
# hunyuanvideo-community/HunyuanVideo transformer/config.json (the diffusers port of tencent/HunyuanVideo)
HUNYUAN_VIDEO = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                     num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                     qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
                     rope_theta=256.0, rope_axes_dim=(16, 56, 56))
# stabilityai/stable-diffusion-3.5-large transformer/config.json
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
SD35_TEXT_TOKENS = 77 + 256  # StableDiffusion3Pipeline: CLIP's 77 tokens, then T5's max_sequence_length 256
# Lightricks/LTX-Video transformer/config.json (LTX-Video 2B, 0.9.x; diffusers' LTXVideoTransformer3DModel defaults
# are these): 28 layers, 32 heads x 64, cross-attention to T5-XXL's 4096-wide tokens projected to 2048, patch size 1
# over a 128-channel latent that its VAE compresses 32x per side and 8x in time.
LTX_VIDEO = dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
                 attention_head_dim=64, cross_attention_dim=2048, num_layers=28, caption_channels=4096,
                 qk_norm="rms_norm_across_heads")
LTX_TEXT_TOKENS = 128  # LTXPipeline pads the T5 prompt to max_sequence_length, 128
LTX_FRAMES = 161  # LTXPipeline's default num_frames (at its default 512 x 704, 50 steps, guidance 3.0)
LTX_SCALE, LTX_FRAMES_PER_LATENT = 32, 8  # its VAE: 32x per side, the first frame then every 8 in one latent frame
HUNYUAN_TEXT_TOKENS = 256  # HunyuanVideoPipeline pads the Llama prompt to max_sequence_length, 256
HUNYUAN_FRAMES = 129  # HunyuanVideoPipeline's default num_frames (at its default 720 x 1280)
HUNYUAN_GUIDANCE = 6.0  # its default (embedded) guidance_scale; true_cfg_scale 1.0: one branch
VIDEO_FRAMES_PER_LATENT = 4  # Wan's and HunyuanVideo's VAEs keep the first frame and pack every further 4
# black-forest-labs/FLUX.1-dev vae/config.json (diffusers' AutoencoderKL): SD's widths, 16 latent channels, no
# quant convolutions
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False)
# Wan-AI/Wan2.1-T2V-14B-Diffusers vae/config.json: diffusers' AutoencoderKLWan defaults (base_dim 96, z_dim 16,
# dim_mult (1, 2, 4, 4), 2 residual blocks per level, temporal downsampling in the last two levels)
WAN_VAE: dict = {}
VAE_SCALE = 8  # pixels per latent row and column, both VAEs (and every VAE below but LTX-Video's)
# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json: the same decoder with 4 latent channels and quant
# convolutions (SD3.5's VAE, stabilityai/stable-diffusion-3.5-large vae/config.json, is Flux.1's config: flux_vae_meta)
SDXL_VAE = {**FLUX_VAE, "latent_channels": 4, "use_quant_conv": True, "use_post_quant_conv": True}
# The other paper models' VAEs are their diffusers classes' defaults, which are the published configs:
# black-forest-labs/FLUX.2-dev vae/config.json (AutoencoderKLFlux2: SD's widths, 32 latent channels, 2x2 patches
# batch-normed), Qwen/Qwen-Image vae/config.json (AutoencoderKLQwenImage: Wan 2.1's architecture, base width 96),
# hunyuanvideo-community/HunyuanVideo vae/config.json (AutoencoderKLHunyuanVideo: SD's widths in 3D, 16 latent
# channels, 8x per side and 4x in time) and Lightricks/LTX-Video vae/config.json of 0.9.0 (AutoencoderKLLTXVideo:
# 128 latent channels, 32x per side and 8x in time, no timestep conditioning).


def flux_vae_meta() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return on_meta(AutoencoderKL, FLUX_VAE, torch.bfloat16)


def wan_vae_meta() -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    return on_meta(AutoencoderKLWan, WAN_VAE, torch.bfloat16)


def sdxl_vae_meta() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return on_meta(AutoencoderKL, SDXL_VAE, torch.bfloat16)


def flux2_vae_meta() -> torch.nn.Module:
    from diffusers import AutoencoderKLFlux2

    return on_meta(AutoencoderKLFlux2, {}, torch.bfloat16)


def qwen_image_vae_meta() -> torch.nn.Module:
    from diffusers import AutoencoderKLQwenImage

    return on_meta(AutoencoderKLQwenImage, {}, torch.bfloat16)


def hunyuan_video_vae_meta() -> torch.nn.Module:
    from diffusers import AutoencoderKLHunyuanVideo

    return on_meta(AutoencoderKLHunyuanVideo, {}, torch.bfloat16)


def ltx_video_vae_meta() -> torch.nn.Module:
    from diffusers import AutoencoderKLLTXVideo

    return on_meta(AutoencoderKLLTXVideo, {}, torch.bfloat16)


def on_meta(cls, config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """`cls(**config)` with its parameters on the meta device (shapes only), in `dtype`, for inference."""
    with torch.device("meta"):
        module = cls(**config)
    return module.to(dtype).eval().requires_grad_(False)


def _rows_of(value: float, rows: int) -> torch.Tensor:
    return torch.full((rows,), value)


@dataclass
class QwenImageModel(TransformerBenchModel):
    """Qwen-Image's inputs as QwenImagePipeline makes them: latents packed in 2x2 patches (B, tokens, 64), each
    row's image shape for the RoPE table; one prompt, so no padding and no text mask."""

    def latent_shape(self, images: int, resolution: tuple[int, int]) -> tuple[int, ...]:
        return (images, self.tokens(resolution), self.module.config.in_channels)

    def extras(self, rows: int, resolution: tuple[int, int] | None = None) -> dict:
        h, w = (r // (self.latent_factor * self.patch) for r in resolution)
        return {"img_shapes": [[(1, h, w)]] * rows}

    def sequence_sizes(self, resolution: tuple[int, int]) -> tuple[int, int]:
        """Image and text tokens attend jointly in every block."""
        return self.tokens(resolution) + self.context_shape[0], len(self.module.transformer_blocks)

    def feature_elements(self, resolution: tuple[int, int]) -> int:
        hidden = self.module.transformer_blocks[0].img_mlp.net[0].proj.out_features  # both streams' MLPs
        return (self.tokens(resolution) + self.context_shape[0]) * hidden


@dataclass
class Flux2Model(TransformerBenchModel):
    """Flux.2's inputs as Flux2Pipeline makes them: 32-channel latents packed in 2x2 patches (B, tokens, 128),
    4-axis position ids (time, row, column, text position) shared by the rows, the embedded guidance per row."""

    guidance: float = FLUX2_DEV_GUIDANCE

    @property
    def shared(self) -> frozenset:
        return frozenset({"img_ids", "txt_ids", "joint_attention_kwargs"})

    def latent_shape(self, images: int, resolution: tuple[int, int]) -> tuple[int, ...]:
        return (images, self.tokens(resolution), self.module.config.in_channels)

    def extras(self, rows: int, resolution: tuple[int, int] | None = None) -> dict:
        h, w = (r // (self.latent_factor * self.patch) for r in resolution)
        img_ids = torch.zeros(h, w, 4)
        img_ids[..., 1] = torch.arange(h)[:, None]
        img_ids[..., 2] = torch.arange(w)[None, :]
        txt_ids = torch.zeros(self.context_shape[0], 4)
        txt_ids[:, 3] = torch.arange(self.context_shape[0])
        return {"img_ids": img_ids.reshape(h * w, 4), "txt_ids": txt_ids, "guidance": _rows_of(self.guidance, rows)}

    def sequence_sizes(self, resolution: tuple[int, int]) -> tuple[int, int]:
        """Image and text tokens attend jointly in every double- and single-stream block."""
        blocks = len(self.module.transformer_blocks) + len(self.module.single_transformer_blocks)
        return self.tokens(resolution) + self.context_shape[0], blocks

    def feature_elements(self, resolution: tuple[int, int]) -> int:
        hidden = self.module.transformer_blocks[0].ff.linear_in.out_features  # the SwiGLU's gate and input
        return (self.tokens(resolution) + self.context_shape[0]) * hidden


@dataclass
class HunyuanVideoModel(TransformerBenchModel):
    """HunyuanVideo's inputs as HunyuanVideoPipeline makes them: video latents (B, 16, latent frames, H/8, W/8),
    the padded prompt's mask (every token valid), the pooled CLIP text and the embedded guidance per row."""

    guidance: float = HUNYUAN_GUIDANCE

    @property
    def shared(self) -> frozenset:
        return frozenset({"attention_kwargs"})

    def latent_frames(self) -> int:
        return (self.frames - 1) // VIDEO_FRAMES_PER_LATENT + 1

    def latent_shape(self, images: int, resolution: tuple[int, int]) -> tuple[int, ...]:
        h, w = (r // self.latent_factor for r in resolution)
        return (images, self.module.config.in_channels, self.latent_frames(), h, w)

    def extras(self, rows: int, resolution: tuple[int, int] | None = None) -> dict:
        """As the pipeline passes them: the tokenizer's mask (int64), the pooled text and guidance x 1000 in the
        transformer's dtype (a float32 one would turn the text stream float32)."""
        dtype = next(self.module.parameters()).dtype
        pooled = torch.zeros(rows, self.module.config.pooled_projection_dim, dtype=dtype)
        return {"encoder_attention_mask": torch.ones(rows, self.context_shape[0], dtype=torch.long),
                "pooled_projections": pooled, "guidance": _rows_of(self.guidance * 1000, rows).to(dtype)}

    def sequence_sizes(self, resolution: tuple[int, int]) -> tuple[int, int]:
        """Video and text tokens attend jointly in every double- and single-stream block (the text refiner's
        attention over the prompt alone is left out: every rank runs it whole)."""
        blocks = len(self.module.transformer_blocks) + len(self.module.single_transformer_blocks)
        return self.tokens(resolution) + self.context_shape[0], blocks

    def feature_elements(self, resolution: tuple[int, int]) -> int:
        hidden = self.module.single_transformer_blocks[0].proj_mlp.out_features
        return (self.tokens(resolution) + self.context_shape[0]) * hidden


@dataclass
class LTXVideoModel(TransformerBenchModel):
    """LTX-Video's inputs as LTXPipeline makes them: latents packed one token per latent pixel (B, tokens, 128), the
    padded prompt's mask (every token valid), the latent's frames, rows and columns for its RoPE and the pipeline's
    interpolation scale (the VAE's compression over the frame rate, 25)."""

    @property
    def shared(self) -> frozenset:
        return frozenset({"attention_kwargs", "rope_interpolation_scale"})

    def latent_frames(self) -> int:
        return (self.frames - 1) // LTX_FRAMES_PER_LATENT + 1

    def latent_shape(self, images: int, resolution: tuple[int, int]) -> tuple[int, ...]:
        return (images, self.tokens(resolution), self.module.config.in_channels)

    def extras(self, rows: int, resolution: tuple[int, int] | None = None) -> dict:
        h, w = (r // self.latent_factor for r in resolution)
        return {"encoder_attention_mask": torch.ones(rows, self.context_shape[0], dtype=torch.long),
                "num_frames": self.latent_frames(), "height": h, "width": w,
                "rope_interpolation_scale": (LTX_FRAMES_PER_LATENT / 25.0, LTX_SCALE, LTX_SCALE)}

    def sequence_sizes(self, resolution: tuple[int, int]) -> tuple[int, int]:
        """Only the video tokens attend to each other (the text enters by cross-attention), in every block."""
        return self.tokens(resolution), len(self.module.transformer_blocks)

    def feature_elements(self, resolution: tuple[int, int]) -> int:
        hidden = self.module.transformer_blocks[0].ff.net[0].proj.out_features  # the GELU MLP, 4x wide
        return self.tokens(resolution) * hidden


@dataclass
class SD35Model(TransformerBenchModel):
    """SD3.5's inputs as StableDiffusion3Pipeline makes them: a latent map (B, 16, H/8, W/8) the model cuts into
    2x2 patches, CLIP's and T5's tokens in one sequence, the pooled CLIP text per row."""

    def latent_shape(self, images: int, resolution: tuple[int, int]) -> tuple[int, ...]:
        h, w = (r // self.latent_factor for r in resolution)
        return (images, self.module.config.in_channels, h, w)

    def extras(self, rows: int, resolution: tuple[int, int] | None = None) -> dict:
        dtype = next(self.module.parameters()).dtype
        return {"pooled_projections": torch.zeros(rows, self.module.config.pooled_projection_dim, dtype=dtype)}

    def sequence_sizes(self, resolution: tuple[int, int]) -> tuple[int, int]:
        """Image and text tokens attend jointly in every block."""
        return self.tokens(resolution) + self.context_shape[0], len(self.module.transformer_blocks)

    def feature_elements(self, resolution: tuple[int, int]) -> int:
        hidden = self.module.transformer_blocks[0].ff.net[0].proj.out_features  # the image stream's MLP
        return (self.tokens(resolution) + self.context_shape[0]) * hidden


def sdxl_meta():
    from diffusers import UNet2DConditionModel

    from ..models.benchmodels import UNETS
    from ..models.benchmodels_base import BenchModel

    config, context, resolution, extras = UNETS["sdxl"]
    unet = on_meta(UNet2DConditionModel, dict(sample_size=resolution // 8, **config), torch.float16)
    return BenchModel("sdxl", unet, context, 8, resolution, extras)


def flux_dev_meta():
    from diffusers import FluxTransformer2DModel

    from ..models.benchmodels_dit import FluxBenchModel

    class FluxDev(FluxBenchModel):
        """flux-small's inputs plus the distilled guidance input Flux.1-dev takes per row."""

        def extras(self, rows, resolution=None):
            return {**super().extras(rows, resolution), "guidance": _rows_of(FLUX_DEV_GUIDANCE, rows)}

    module = on_meta(FluxTransformer2DModel, FLUX_DEV, torch.bfloat16)
    return FluxDev("flux-dev", module, (FLUX_DEV_TEXT_TOKENS, FLUX_DEV["joint_attention_dim"]), latent_factor=8,
                   default_resolution=1024, family="diffusers_dit:flux", patch=2)


def wan14b_meta():
    from diffusers import WanTransformer3DModel

    from ..models.benchmodels_dit import WAN_TEXT_TOKENS, WanBenchModel

    module = on_meta(WanTransformer3DModel, WAN_14B, torch.bfloat16)
    return WanBenchModel("wan-14b", module, (WAN_TEXT_TOKENS, WAN_14B["text_dim"]), latent_factor=8,
                         default_resolution="720x1280", family="diffusers_dit:wan", patch=2, frames=WAN_FRAMES)


def qwen_image_meta():
    from diffusers import QwenImageTransformer2DModel

    module = on_meta(QwenImageTransformer2DModel, QWEN_IMAGE, torch.bfloat16)
    return QwenImageModel("qwen-image", module, (QWEN_IMAGE_TEXT_TOKENS, QWEN_IMAGE["joint_attention_dim"]),
                          latent_factor=8, default_resolution=1328, family="diffusers_dit:qwen_image", patch=2)


def flux2_dev_meta():
    from diffusers import Flux2Transformer2DModel

    module = on_meta(Flux2Transformer2DModel, FLUX2_DEV, torch.bfloat16)
    return Flux2Model("flux2-dev", module, (FLUX2_DEV_TEXT_TOKENS, FLUX2_DEV["joint_attention_dim"]), latent_factor=8,
                      default_resolution=1024, family="diffusers_dit", patch=2)


def hunyuan_video_meta():
    from diffusers import HunyuanVideoTransformer3DModel

    module = on_meta(HunyuanVideoTransformer3DModel, HUNYUAN_VIDEO, torch.bfloat16)
    return HunyuanVideoModel("hunyuan-video", module, (HUNYUAN_TEXT_TOKENS, HUNYUAN_VIDEO["text_embed_dim"]),
                             latent_factor=8, default_resolution="720x1280", family="diffusers_dit", patch=2,
                             frames=HUNYUAN_FRAMES)


def ltx_video_meta():
    from diffusers import LTXVideoTransformer3DModel

    module = on_meta(LTXVideoTransformer3DModel, LTX_VIDEO, torch.bfloat16)
    return LTXVideoModel("ltx-video", module, (LTX_TEXT_TOKENS, LTX_VIDEO["caption_channels"]), latent_factor=LTX_SCALE,
                         default_resolution="512x704", family="diffusers_dit", patch=1, frames=LTX_FRAMES)


def sd35_large_meta():
    from diffusers import SD3Transformer2DModel

    module = on_meta(SD3Transformer2DModel, SD35_LARGE, torch.bfloat16)
    return SD35Model("sd3.5-large", module, (SD35_TEXT_TOKENS, SD35_LARGE["joint_attention_dim"]), latent_factor=8,
                     default_resolution=1024, family="diffusers_dit:sd3", patch=2)
