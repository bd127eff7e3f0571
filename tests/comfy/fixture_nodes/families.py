"""Tiny DiT and video models of every ComfyUI model family, built from ComfyUI's own classes.

Each family names its model config class in comfy.supported_models (a host version that lacks it lacks the
family), a narrow unet_config with the family's real block structure (double and single stream blocks, joint
blocks, refiners: one or two of each, a few heads), the width and extra keys its conditioning needs (whatever
that class's model_base extra_conds reads) and its latent's shape (channels, latent frames for video, a tiny
spatial size). Flux, SD3 and Wan 2.1 use the widths ComfyUI's model detection infers from key shapes (head
width 128 for Flux and Wan, 64 per joint block for MMDiT), so write_families.py can save them as files that
UNETLoader detects as the same family and config.
"""

from __future__ import annotations

import torch

import comfy.supported_models

TOKENS = 8  # text tokens per prompt


def _flux(**changes):  # Flux.1 dev: double + single stream blocks, pooled vector, guidance embedding
    return {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 64,
            "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
            "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
            "txt_ids_dims": [], "yak_mlp": False, "txt_norm": False, **changes}


def _wan(**changes):  # Wan 2.1 14B's structure; text_dim is the class's default, 4096 (detection does not read it)
    return {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "dim": 256, "ffn_dim": 512,
            "freq_dim": 256, "out_dim": 16, "num_heads": 2, "num_layers": 2,
            "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16, **changes}


def _hunyuan_video(**changes):
    return {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
            "context_in_dim": 64, "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
            "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 256, "patch_size": [1, 2, 2],
            "qkv_bias": True, "guidance_embed": True, "byt5": False, "meanflow": False,
            "use_cond_type_embedding": False, "vision_in_dim": None, "meanflow_sum": False, **changes}


def _clip_vision_output(generator, tokens=257, width=1280):
    """What CLIPVisionEncode gives (comfy.clip_vision.Output): Wan i2v reads penultimate_hidden_states."""
    import comfy.clip_vision

    out = comfy.clip_vision.Output()
    out.penultimate_hidden_states = torch.randn(1, tokens, width, generator=generator)
    out.last_hidden_state = out.penultimate_hidden_states
    out.image_embeds = torch.randn(1, 1024, generator=generator)
    return out


def _start_image(shape):
    """The encoded start image an image-to-video node puts in both prompts (concat_latent_image): one latent
    frame of a seeded random image, zeros after it (as WanImageToVideo leaves the frames to generate)."""
    def extras(generator):
        image = torch.zeros(1, *shape)
        image[:, :, :1] = torch.randn(1, shape[0], 1, *shape[2:], generator=generator)
        return {"concat_latent_image": image}
    return extras


IMAGE_16 = (16, None, 8, 8)  # 64 px images in 16-channel latent formats (Flux, SD3, Qwen-Image, Z-Image)
VIDEO_16 = (16, 3, 8, 8)  # 9 frames at 64 px in Wan 2.1's and HunyuanVideo's latent (4x temporal, 8x spatial)

# family: (comfy.supported_models class, unet_config, conditioning (context width, pooled width or None, extra
# keys: a function of a seeded generator), latent (channels, frames or None, height, width))
FAMILIES = {
    "flux": ("Flux", _flux(), (64, 32, None), IMAGE_16),
    "flux_schnell": ("FluxSchnell", _flux(guidance_embed=False), (64, 32, None), IMAGE_16),
    # six blocks that hold most of its weights: sharded, a device holds less than the whole (test_weights_sharded)
    "flux_deep": ("Flux", _flux(depth=2, depth_single_blocks=4), (64, 32, None), IMAGE_16),
    "flux2": ("Flux2", _flux(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None,
                             mlp_ratio=3.0, axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False,
                             global_modulation=True, mlp_silu_act=True, ops_bias=False, default_ref_method="index",
                             ref_index_scale=10.0, txt_ids_dims=[3]),
              (64, None, None), (128, None, 4, 4)),
    "chroma": ("Chroma", {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 64,
                          "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
                          "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64,
                          "out_dim": 256, "hidden_dim": 128, "n_layers": 1, "txt_ids_dims": [], "vec_in_dim": None},
               (64, None, None), IMAGE_16),
    "zimage": ("ZImage", {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 64,
                          "n_layers": 2, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 2, "n_kv_heads": 2,
                          "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
                          "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
                          "pad_tokens_multiple": 32},
               (64, None, None), IMAGE_16),
    # Lumina 2: NextDiT without Z-Image's padding to 32 tokens, grouped keys and values (2 heads, 1 key head); no
    # text padding mask (v0.8's stock sampler fails on one at cfg > 1, in its caption refiner's attention)
    "lumina2": ("Lumina2", {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256,
                            "cap_feat_dim": 64, "n_layers": 2, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 2,
                            "n_kv_heads": 1, "axes_dims": [32, 48, 48], "axes_lens": [300, 512, 512],
                            "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0},
                (64, None, None), IMAGE_16),
    "sd3": ("SD3", {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
                    "adm_in_channels": 64, "num_patches": 256, "pos_embed_max_size": 16, "pos_embed_scaling_factor": None,
                    "context_embedder_config": {"target": "torch.nn.Linear",
                                                "params": {"in_features": 64, "out_features": 128}},
                    "x_block_self_attn_layers": []},
            (64, 64, None), IMAGE_16),
    # SD3.5 Medium's structure: a second, image-only self-attention in the first joint block
    "sd35": ("SD3", {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
                     "adm_in_channels": 64, "num_patches": 256, "pos_embed_max_size": 16,
                     "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [0],
                     "context_embedder_config": {"target": "torch.nn.Linear",
                                                 "params": {"in_features": 64, "out_features": 128}}},
             (64, 64, None), IMAGE_16),
    "qwen_image": ("QwenImage", {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16,
                                 "num_layers": 2, "attention_head_dim": 128, "num_attention_heads": 2,
                                 "joint_attention_dim": 64, "axes_dims_rope": (16, 56, 56)},
                   (64, None, None), IMAGE_16),
    # Qwen-Image with a text attention mask (padding): a call a split by tokens in ComfyUI cannot take
    "qwen_image_masked": ("QwenImage", {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64,
                                        "out_channels": 16, "num_layers": 2, "attention_head_dim": 128,
                                        "num_attention_heads": 2, "joint_attention_dim": 64,
                                        "axes_dims_rope": (16, 56, 56)},
                          (64, None, lambda g: {"attention_mask": torch.tensor([[1] * (TOKENS - 2) + [0, 0]])}),
                          IMAGE_16),
    "wan21_t2v": ("WAN21_T2V", _wan(), (4096, None, None), VIDEO_16),
    # Wan 2.1 i2v: image and mask channels concatenated to the latent, and CLIP vision tokens in the context
    "wan21_i2v": ("WAN21_I2V", _wan(model_type="i2v", in_dim=36),
                  (4096, None, lambda g: {**_start_image(VIDEO_16)(g), "clip_vision_output": _clip_vision_output(g)}),
                  VIDEO_16),
    # Wan 2.2 14B i2v: the concatenated image, no CLIP vision input (detected as WAN21_T2V with 36 channels)
    "wan22_i2v": ("WAN21_T2V", _wan(in_dim=36), (4096, None, _start_image(VIDEO_16)), VIDEO_16),
    # Wan 2.2 5B: its own 48-channel latent (16x spatial) and model class, per-frame timesteps under a noise mask
    "wan22_5b": ("WAN22_T2V", _wan(in_dim=48, out_dim=48), (4096, None, None), (48, 3, 4, 4)),
    "hunyuan_video": ("HunyuanVideo", _hunyuan_video(), (64, 32, None), VIDEO_16),
    "hunyuan_video15": ("HunyuanVideo15", _hunyuan_video(in_channels=65, out_channels=32, vec_in_dim=None,
                                                          patch_size=[1, 1, 1], guidance_embed=False,
                                                          use_cond_type_embedding=True, vision_in_dim=1152,
                                                          meanflow_sum=True),
                        (64, None, None), (32, 3, 4, 4)),
    # LTX-Video: 128 channels, 8x temporal and 32x spatial; its text encoder hands over an attention mask
    "ltxv": ("LTXV", {"image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 64, "attention_head_dim": 32,
                      "num_attention_heads": 2, "caption_channels": 64, "num_layers": 2},
             (64, None, lambda g: {"attention_mask": torch.ones(1, TOKENS, dtype=torch.long)}), (128, 3, 4, 4)),
    # AuraFlow: a family Tandem has no adapter for (its Multi-GPU run takes the stock path and says so)
    "aura_flow": ("AuraFlow", {"in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 128, "n_layers": 2,
                               "n_double_layers": 1, "n_heads": 2, "global_conddim": 128, "cond_seq_dim": 64,
                               "max_seq": 64},
                  (64, None, None), (4, None, 8, 8)),
}


def available() -> list[str]:
    """The families whose model config class this host has."""
    return [name for name, (cls, *_) in FAMILIES.items() if hasattr(comfy.supported_models, cls)]


def fill_buffers(module, seed: int):
    """Seeded values for the floating-point buffers ComfyUI leaves uninitialised (MMDiT's pos_embed, which a
    checkpoint carries); parameters are _seeded's."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, buffer in module.named_buffers():
            if buffer.is_floating_point():
                buffer.copy_(0.5 * torch.randn(buffer.shape, generator=generator))
    return module


def model_config(family: str):
    cls, unet_config, _, _ = FAMILIES[family]
    return getattr(comfy.supported_models, cls)(dict(unet_config, dtype=torch.float32))


def conditioning(family: str, seed: int) -> list:
    """A seeded random prompt of the family's context width, with its pooled vector (None where the family has
    none, as its text encoder hands it over: older hosts read the key unconditionally) and extra keys."""
    _, _, (width, pooled, extras), _ = FAMILIES[family]
    generator = torch.Generator().manual_seed(seed)
    keys = {"pooled_output": torch.randn(1, pooled, generator=generator) if pooled else None}
    keys.update(extras(generator) if extras else {})
    return [[torch.randn(1, TOKENS, width, generator=generator), keys]]


def latent(family: str, batch: int, noise_mask: bool = False, grow: int = 0) -> dict:
    """The empty latent the family's own empty-latent node gives; noise_mask: the first latent frame holds a
    seeded random encoded image that sampling keeps, as Wan 2.2's image-to-video latent node marks it; grow:
    `grow` more latent rows and columns (an odd size: the models pad it to their patch)."""
    channels, frames, height, width = FAMILIES[family][3]
    height, width = height + grow, width + grow
    shape = (batch, channels) + ((frames,) if frames else ()) + (height, width)
    out = {"samples": torch.zeros(shape)}
    if noise_mask:
        out["samples"][:, :, :1] = torch.randn((1, channels, 1) + shape[3:], generator=torch.Generator().manual_seed(7))
        mask = torch.ones((batch, 1) + shape[2:])
        mask[:, :, :1] = 0.0
        out["noise_mask"] = mask
    return out
