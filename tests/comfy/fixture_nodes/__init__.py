"""Test-only ComfyUI nodes: a tiny SD1.x-like model built from ComfyUI's own classes, and seeded conditioning.

No checkpoint can be downloaded on test machines, so the model is ComfyUI's SD15 model class with a narrow
unet_config (SD1.5's block structure: 4 levels, 2 res blocks each, attention where SD1.5 has it) and seeded
random weights (ComfyUI's ops leave weights uninitialised).
"""

import contextlib

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

from . import families
from .describe import NODES as _DESCRIBE_NODES
from .model_node import ModelToModel

CONTEXT_DIM = 32

TINY_SD1_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "dtype": torch.float32, "in_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 1, 2, 2],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": CONTEXT_DIM,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


# SDXL's structure (3 levels, attention from the second, linear projections, the 2816-wide ADM vector of
# pooled text embedding + size embeddings), narrow.
TINY_SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "dtype": torch.float32, "in_channels": 4,
    "model_channels": 32, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 1, 1],
    "channel_mult": [1, 2, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
    "context_dim": CONTEXT_DIM, "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# SD1.5's own widths (320 channels, 768-wide text context, 860 M parameters): for timing the nodes inside
# ComfyUI (`tandem workflow compare`), not for the tests, which use the narrow models.
SD15_FULL_UNET = {**TINY_SD1_UNET, "model_channels": 320, "channel_mult": [1, 2, 4, 4], "context_dim": 768}
FAMILIES = {"sd1": (comfy.supported_models.SD15, TINY_SD1_UNET), "sdxl": (comfy.supported_models.SDXL, TINY_SDXL_UNET),
            "sd15_full_size": (comfy.supported_models.SD15, SD15_FULL_UNET)}


def _seeded(module, seed: int):
    """Fills every parameter with seeded random values (ComfyUI's ops leave weights uninitialised)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=generator) * (1.0 / p[0].numel()) ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return module


def _patcher(model):
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def tiny_sd1_model(seed: int, family: str = "sd1"):
    config_class, unet_config = FAMILIES[family]
    return _patcher(_seeded(config_class(dict(unet_config)).get_model({}), seed))


class TandemTestTinySD1Model:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "family": (list(FAMILIES), {"default": "sd1"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, seed, family="sd1"):
        return (tiny_sd1_model(seed, family),)


class TandemTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "tokens": ("INT", {"default": 77, "min": 1, "max": 308}),
                             "pooled": ("BOOLEAN", {"default": False})},
                "optional": {"width": ("INT", {"default": CONTEXT_DIM, "min": 1, "max": 4096})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, seed, tokens, pooled=False, width=CONTEXT_DIM):
        generator = torch.Generator().manual_seed(seed)
        context = torch.randn(1, tokens, width, generator=generator)
        extras = {"pooled_output": torch.randn(1, 1280, generator=generator), "width": 64, "height": 64} if pooled else {}
        return ([[context, extras]],)


class _SeededFamilyNode:
    """Inputs of the per-family fixtures: a seed and a DiT or video family this host has (families.py)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "family": (families.available(), {"default": "flux"})}}

    FUNCTION = "build"
    CATEGORY = "testing"


class TandemTestTinyDiT(_SeededFamilyNode):
    """A tiny model of a DiT or video family, from ComfyUI's own classes, seeded weights."""

    RETURN_TYPES = ("MODEL",)

    def build(self, seed, family):
        model = families.fill_buffers(_seeded(families.model_config(family).get_model({}), seed), seed)
        return (_patcher(model),)


class TandemTestFamilyConditioning(_SeededFamilyNode):
    """A seeded random prompt for a DiT or video family: its context width, pooled vector and extra keys."""

    RETURN_TYPES = ("CONDITIONING",)

    def build(self, seed, family):
        return (families.conditioning(family, seed),)


class TandemTestFamilyLatent:
    """The family's empty latent (video: several latent frames); noise_mask: an image-to-video latent whose
    first frame is kept; grow: that many more latent rows and columns (odd sizes, token counts no degree
    divides)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (families.available(), {"default": "flux"}),
                             "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
                             "noise_mask": ("BOOLEAN", {"default": False})},
                "optional": {"grow": ("INT", {"default": 0, "min": 0, "max": 64})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, family, batch_size, noise_mask=False, grow=0):
        return (families.latent(family, batch_size, noise_mask, grow),)


class TandemTestTinyControlNet:
    """A ControlNet of the tiny SD1.x UNet's shape (ComfyUI's cldm.ControlNet), seeded random weights: its
    residuals are computed on the host and travel with each call to the workers."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, seed):
        import comfy.cldm.cldm
        import comfy.controlnet

        config = {k: v for k, v in TINY_SD1_UNET.items() if k != "out_channels"}
        control_model = _seeded(comfy.cldm.cldm.ControlNet(hint_channels=3, device="cpu", num_heads=8, **config), seed)
        return (comfy.controlnet.ControlNet(control_model, load_device=comfy.model_management.get_torch_device()),)


class TandemTestBatchProbe:
    """Records how ComfyUI batches each model call of a sampling run: one JSON line per call (its chunks, as in
    cond_or_uncond) in output/probes/<name>.jsonl. memory_usage_factor > 0 replaces the model's factor while this
    clone is loaded (an object patch), so ComfyUI's memory estimate can be made to exceed any free memory."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "name": ("STRING", {"default": "probe"}),
                             "memory_usage_factor": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e15})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, model, name, memory_usage_factor=0.0):
        import json
        import os

        import folder_paths

        path = os.path.join(folder_paths.get_output_directory(), "probes", f"{name}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        patched = model.clone()
        if memory_usage_factor > 0:
            patched.add_object_patch("memory_usage_factor", memory_usage_factor)

        def record(apply_model, args):
            with open(path, "a") as out:
                out.write(json.dumps(list(args["cond_or_uncond"])) + "\n")
            return apply_model(args["input"], args["timestep"], **args["c"])

        patched.set_model_unet_function_wrapper(record)
        return (patched,)


class TandemTestReplacedForward(ModelToModel):
    """Replaces the diffusion model's `forward` on its instance (an object patch), as caches such as TeaCache swap
    `forward_orig`; the replacement computes what the class's own forward does. Tandem cannot tell what a
    replaced method does, so a Multi-GPU run of this model takes the stock path (and says so)."""

    def build(self, model):
        import types

        patched = model.clone()
        diffusion_model = patched.get_model_object("diffusion_model")

        def forward(self, *args, **kwargs):
            return type(self).forward(self, *args, **kwargs)

        patched.add_object_patch("diffusion_model.forward", types.MethodType(forward, diffusion_model))
        return (patched,)


class TandemTestObjectPatch:
    """An object patch of ComfyUI's own kind (add_object_patch) with a JSON value: e.g. key
    "diffusion_model.params.guidance_embed", value "false"."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "key": ("STRING", {"default": ""}),
                             "value": ("STRING", {"default": "null"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, model, key, value):
        import json

        patched = model.clone()
        patched.add_object_patch(key, json.loads(value))
        return (patched,)


class _SeededVAENode:
    """A fixture node that builds a VAE from a seed."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "build"
    CATEGORY = "testing"


class TandemTestSeededVAE(_SeededVAENode):
    """ComfyUI's own SD VAE (comfy.sd.VAE from an SD-shaped state dict: 4 latent channels, 128 to 512 wide),
    every weight seeded: decoding a small latent is cheap and deterministic."""

    def build(self, seed):
        import comfy.sd
        from comfy.ldm.models.autoencoder import AutoencoderKL

        ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
        model = _seeded(AutoencoderKL(ddconfig=ddconfig, embed_dim=4), seed)
        return (comfy.sd.VAE(sd=model.state_dict()),)


class TandemTestSeededFlux2VAE(_SeededVAENode):
    """ComfyUI's own Flux.2 VAE (comfy.sd.VAE detects it by its batch-norm statistics: 32 channels folded 2x2 into a
    128-channel latent, 16 pixels per latent row), every weight and statistic seeded."""

    def build(self, seed):
        import comfy.sd
        from comfy.ldm.models.autoencoder import AutoencoderKL

        ddconfig = {"double_z": True, "z_channels": 32, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
                    "batch_norm_latent": True}
        model = _seeded(AutoencoderKL(ddconfig=ddconfig, embed_dim=32), seed)
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # the latent's statistics: a mean near 0, a variance near 1, never negative
            model.bn.running_mean.copy_(0.1 * torch.randn(model.bn.running_mean.shape, generator=generator))
            model.bn.running_var.copy_(0.5 + torch.rand(model.bn.running_var.shape, generator=generator))
        return (comfy.sd.VAE(sd=model.state_dict()),)


class TandemTestSeededWanVAE(_SeededVAENode):
    """ComfyUI's own Wan 2.1 video VAE (comfy.sd.VAE from a state dict it detects as Wan 2.1), 8 channels wide,
    seeded inside the output's clamp (parallel_backend's seed_wan_weights)."""

    def build(self, seed):
        import comfy.sd
        from comfy.ldm.wan.vae import WanVAE

        from parallel_backend.models.benchmodels_vae import seed_wan_weights

        model = WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                       temperal_downsample=[False, True, True], image_channels=3, dropout=0.0)
        return (comfy.sd.VAE(sd=seed_wan_weights(model, seed).state_dict()),)


class TandemTestSeededWan22VAE(_SeededVAENode):
    """ComfyUI's own Wan 2.2 video VAE (comfy.sd.VAE detects it by its residual upsamples: 48 latent channels, 2x2
    pixels patchified, 16 pixels per latent row), 16 channels wide. comfy.sd.VAE builds this class at its released
    width (160); while it reads the state dict, the class is built at the state dict's width instead."""

    def build(self, seed):
        import comfy.ldm.wan.vae2_2 as wan22
        import comfy.sd

        from parallel_backend.models.benchmodels_vae import seed_wan_weights

        released = wan22.WanVAE

        def narrow(**config):
            return released(**{**config, "dim": 16})

        model = seed_wan_weights(narrow(z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                        temperal_downsample=[False, True, True], dropout=0.0), seed)
        with _building(wan22, "WanVAE", narrow):
            return (comfy.sd.VAE(sd=model.state_dict()),)


@contextlib.contextmanager
def _building(owner, name: str, narrow):
    """While comfy.sd.VAE reads a state dict, `owner.name` (the class it builds, at its released width) is
    `narrow`, which builds it at the state dict's width."""
    released = getattr(owner, name)
    setattr(owner, name, narrow)
    try:
        yield
    finally:
        setattr(owner, name, released)


class TandemTestSeededHunyuanVideoVAE(_SeededVAENode):
    """ComfyUI's own HunyuanVideo 1.0 VAE (comfy.sd.VAE detects it by its 3D convolutions: an AutoencoderKL of
    CarriedConv3d, 16 latent channels, 8 pixels per latent row, 4 frames per latent frame after the first), 32
    channels wide where comfy.sd.VAE builds 128, seeded inside the output's clamp."""

    def build(self, seed):
        import comfy.sd
        from comfy.ldm.models.autoencoder import AutoencoderKL

        from parallel_backend.models.benchmodels_vae import seed_wan_weights

        def narrow(ddconfig, **config):
            return AutoencoderKL(ddconfig={**ddconfig, "ch": 32}, **config)

        ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
                    "conv3d": True, "time_compress": 4}
        model = seed_wan_weights(AutoencoderKL(ddconfig=ddconfig, embed_dim=16), seed)
        with _building(comfy.sd, "AutoencoderKL", narrow):
            return (comfy.sd.VAE(sd=model.state_dict()),)


class TandemTestSeededHunyuanVideo15VAE(_SeededVAENode):
    """ComfyUI's own HunyuanVideo 1.5 VAE (comfy.sd.VAE detects it by its 32-channel latent and 3D convolutions:
    an AutoencodingEngine of hunyuan_video/vae_refiner.py's encoder and decoder, 16 pixels per latent row, 4 frames
    per latent frame after the first), 32 to 64 channels wide where comfy.sd.VAE builds 128 to 1024."""

    def build(self, seed):
        return (_seeded_engine(seed, "vae_refiner", [32, 32, 64, 64, 64], z_channels=32, ffactor_spatial=16,
                               ffactor_temporal=4),)


class TandemTestSeededHunyuanImage21VAE(_SeededVAENode):
    """ComfyUI's own HunyuanImage 2.1 VAE (comfy.sd.VAE detects it by its 64-channel latent: an AutoencodingEngine
    of hunyuan_video/vae.py's 2D encoder and decoder, 32 pixels per latent row), 32 to 128 channels wide where
    comfy.sd.VAE builds 128 to 1024."""

    def build(self, seed):
        return (_seeded_engine(seed, "vae", [32, 32, 64, 64, 128, 128], z_channels=64, ffactor_spatial=32),)


class TandemTestSeededHunyuanImage21RefinerVAE(_SeededVAENode):
    """ComfyUI's own HunyuanImage 2.1 refiner VAE (comfy.sd.VAE detects it by its 32-channel latent and 3D
    convolutions without a caller's padding: vae_refiner.py's encoder and decoder with refiner_vae off, GroupNorms,
    one frame per image), 32 to 64 channels wide where comfy.sd.VAE builds 128 to 1024."""

    def build(self, seed):
        return (_seeded_engine(seed, "vae_refiner", [32, 32, 64, 64, 64], z_channels=32, ffactor_spatial=16,
                               ffactor_temporal=4, refiner_vae=False),)


def _seeded_engine(seed: int, coders: str, widths: list, **params):
    """comfy.sd.VAE of an AutoencodingEngine of comfy.ldm.hunyuan_video.`coders`' encoder and decoder, `widths`
    wide, seeded inside the output's clamp: built as ComfyUI builds it from the state dict, at `widths` in place of
    the released widths."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    from parallel_backend.models.benchmodels_vae import seed_wan_weights

    def narrow(**config):
        for part in ("encoder_config", "decoder_config"):
            config[part] = {**config[part], "params": {**config[part]["params"], "block_out_channels": widths}}
        return AutoencodingEngine(**config)

    params = {"block_out_channels": widths, "in_channels": 3, "out_channels": 3, "num_res_blocks": 2,
              "downsample_match_channel": True, "upsample_match_channel": True, **params}
    model = seed_wan_weights(AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": f"comfy.ldm.hunyuan_video.{coders}.Encoder", "params": params},
        decoder_config={"target": f"comfy.ldm.hunyuan_video.{coders}.Decoder", "params": params}), seed)
    with _building(comfy.sd, "AutoencodingEngine", narrow):
        return comfy.sd.VAE(sd=model.state_dict())


def _ltx_config(noise: bool, inject: bool = False) -> dict:
    """LTX-Video 0.9.5's kinds of blocks (space-to-depth downsamples, residual depth-to-space upsamples, pixel
    norms), one layer each and no widening: 16 channels where ComfyUI reads the base width (v0.24), its 128
    otherwise (v0.8). `inject`: the first decoder block adds noise inside its resnets, as 0.9.1's do."""
    down = [["res_x", {"num_layers": 1}], ["compress_space_res", {"multiplier": 1}], ["res_x", {"num_layers": 1}],
            ["compress_time_res", {"multiplier": 1}], ["compress_all_res", {"multiplier": 1}],
            ["compress_all_res", {"multiplier": 1}], ["res_x", {"num_layers": 1}]]
    up = [["res_x", {"num_layers": 1, "inject_noise": inject}]] + [
        block for _ in range(3) for block in (["compress_all", {"residual": True, "multiplier": 1}],
                                              ["res_x", {"num_layers": 1, "inject_noise": False}])]
    return {"_class_name": "CausalVideoAutoencoder", "dims": 3, "in_channels": 3, "out_channels": 3,
            "latent_channels": 128, "encoder_blocks": down, "decoder_blocks": up, "scaling_factor": 1.0,
            "norm_layer": "pixel_norm", "patch_size": 4, "latent_log_var": "uniform", "use_quant_conv": False,
            "causal_decoder": False, "timestep_conditioning": noise, "encoder_base_channels": 16,
            "decoder_base_channels": 16}


class TandemTestSeededLTXVAE(_SeededVAENode):
    """ComfyUI's own LTX-Video VAE (comfy.sd.VAE detects it; its config, `_ltx_config`, travels in the metadata as
    a checkpoint's does), seeded inside the output's range, with its latent statistics.
    With `noise`, the decoder is conditioned on the timestep (0.9.1 and later): it adds unseeded noise to the
    latent before it decodes; with `inject_noise` too, its first decoder block adds noise inside its resnets
    (0.9.1's)."""

    @classmethod
    def INPUT_TYPES(cls):
        inputs = super().INPUT_TYPES()
        inputs["optional"] = {"noise": ("BOOLEAN", {"default": False}),
                              "inject_noise": ("BOOLEAN", {"default": False})}
        return inputs

    def build(self, seed, noise=False, inject_noise=False):
        import json

        import comfy.sd
        from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE

        from parallel_backend.models.benchmodels_vae import seed_wan_weights

        config = _ltx_config(noise, inject_noise)
        model = seed_wan_weights(VideoVAE(config=config), seed)
        generator = torch.Generator().manual_seed(seed + 1)
        statistics = model.per_channel_statistics
        with torch.no_grad():
            statistics.get_buffer("std-of-means").copy_(0.5 + torch.rand(128, generator=generator))
            statistics.get_buffer("mean-of-means").copy_(0.1 * torch.randn(128, generator=generator))
        return (comfy.sd.VAE(sd=model.state_dict(), metadata={"config": json.dumps({"vae": config})}),)


class TandemTestSeededLatent:
    """A latent of seeded normal noise (what a VAE decodes in the tests)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "channels": ("INT", {"default": 4, "min": 1, "max": 128}),
                             "rows": ("INT", {"default": 8, "min": 1, "max": 256}),
                             "columns": ("INT", {"default": 8, "min": 1, "max": 256})},
                "optional": {"frames": ("INT", {"default": 0, "min": 0, "max": 64})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, seed, channels, rows, columns, frames=0):
        """frames > 0: a video latent (batch, channels, frames, rows, columns)."""
        generator = torch.Generator().manual_seed(seed)
        shape = (1, channels, *((frames,) if frames else ()), rows, columns)
        return ({"samples": torch.randn(shape, generator=generator)},)


class TandemTestSeedTorch:
    """Passes a latent on after seeding the server's global torch generator: what draws from it next (a decode's
    unseeded noise) draws the same in every run. It runs at every prompt (`IS_CHANGED`), after the VAE is built
    (its input: building draws from the generator too)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "seed"
    CATEGORY = "testing"

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")

    def seed(self, samples, vae, seed):
        torch.manual_seed(seed)
        return (samples,)


class TandemTestImageAsLatent:
    """An IMAGE wrapped as a LATENT, so the stock SaveLatent keeps it exactly (no 8-bit PNG)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, images):
        return ({"samples": images.contiguous()},)


NODE_CLASS_MAPPINGS = {"TandemTestTinySD1Model": TandemTestTinySD1Model,
                       "TandemTestSeededVAE": TandemTestSeededVAE,
                       "TandemTestSeededWanVAE": TandemTestSeededWanVAE,
                       "TandemTestSeededFlux2VAE": TandemTestSeededFlux2VAE,
                       "TandemTestSeededWan22VAE": TandemTestSeededWan22VAE,
                       "TandemTestSeededLTXVAE": TandemTestSeededLTXVAE,
                       "TandemTestSeededHunyuanVideoVAE": TandemTestSeededHunyuanVideoVAE,
                       "TandemTestSeededHunyuanVideo15VAE": TandemTestSeededHunyuanVideo15VAE,
                       "TandemTestSeededHunyuanImage21VAE": TandemTestSeededHunyuanImage21VAE,
                       "TandemTestSeededHunyuanImage21RefinerVAE": TandemTestSeededHunyuanImage21RefinerVAE,
                       "TandemTestSeededLatent": TandemTestSeededLatent,
                       "TandemTestImageAsLatent": TandemTestImageAsLatent,
                       "TandemTestSeedTorch": TandemTestSeedTorch,
                       "TandemTestObjectPatch": TandemTestObjectPatch,
                       "TandemTestReplacedForward": TandemTestReplacedForward,
                       "TandemTestConditioning": TandemTestConditioning,
                       "TandemTestTinyDiT": TandemTestTinyDiT,
                       "TandemTestFamilyConditioning": TandemTestFamilyConditioning,
                       "TandemTestFamilyLatent": TandemTestFamilyLatent,
                       "TandemTestTinyControlNet": TandemTestTinyControlNet,
                       "TandemTestBatchProbe": TandemTestBatchProbe}
NODE_CLASS_MAPPINGS.update(_DESCRIBE_NODES)

try:  # ComfyUI's own multi-GPU node exists from v0.23 on
    import comfy.multigpu  # noqa: F401

    from .multigpu_stand_in import NODES as _MULTIGPU_NODES

    NODE_CLASS_MAPPINGS.update(_MULTIGPU_NODES)
except ImportError:
    pass
