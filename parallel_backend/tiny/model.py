"""The embedded default model: build it from its config, save it, load it (offline, from this folder)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .codec import PatchCodec
from .text import DEFAULT_VOCAB, TinyTextEncoder, WordTokenizer

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS_FILE = "tiny_digits.safetensors"
CONFIG_FILE = "tiny_digits.json"

# SD1.5's noise schedule (scaled_linear, 1000 steps, epsilon prediction), so every SD scheduler applies unchanged.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "timestep_spacing": "leading",
}

# SD1.5's block pattern, one level shorter: cross-attention in the first two levels, skips at every layer.
UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}

TEXT_CONFIG = {"max_length": 8, "width": 64, "layers": 2, "heads": 4}


def default_config() -> dict:
    return {
        "pixel_size": 32,
        "latent_shape": [4, 8, 8],
        "patch": 4,
        "vocab": list(DEFAULT_VOCAB),
        "text": dict(TEXT_CONFIG),
        "unet": dict(UNET_CONFIG),
        "scheduler": dict(SCHEDULER_CONFIG),
    }


@dataclass
class TinyDigitsModel:
    """The parts of the digits model, shaped like Stable Diffusion's (tokenizer, text encoder, UNet, codec)."""

    config: dict
    tokenizer: WordTokenizer
    text_encoder: TinyTextEncoder
    unet: torch.nn.Module  # diffusers UNet2DConditionModel
    codec: PatchCodec

    @classmethod
    def build(cls, config: dict | None = None) -> "TinyDigitsModel":
        """Builds untrained parts from a config (default_config() if None)."""
        from diffusers import UNet2DConditionModel

        config = config or default_config()
        tokenizer = WordTokenizer(tuple(config["vocab"]), config["text"]["max_length"])
        text = config["text"]
        text_encoder = TinyTextEncoder(len(config["vocab"]), text["max_length"], text["width"], text["layers"],
                                       text["heads"])
        unet = UNet2DConditionModel(**config["unet"])
        codec = PatchCodec(config["patch"], config["latent_shape"][0])
        return cls(config, tokenizer, text_encoder, unet, codec)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder, "unet": self.unet, "codec": self.codec}

    def to(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "TinyDigitsModel":
        # The codec stays fp32: it is a tiny linear map and fp16 would only cost precision.
        device = torch.device(device)
        for module in (self.text_encoder, self.unet):
            weight = next(module.parameters())
            if weight.device != device or weight.dtype != dtype:  # diffusers warns on a no-op cast
                module.to(device=device, dtype=dtype)
        self.codec.to(device=device)
        return self

    def eval(self) -> "TinyDigitsModel":
        for module in self.modules().values():
            module.eval().requires_grad_(False)
        return self

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}.{key}": value.detach().to("cpu", torch.float32).contiguous()
                   for name, module in self.modules().items() for key, value in module.state_dict().items()}
        save_file(tensors, str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(self.config, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path | None = None) -> "TinyDigitsModel":
        """Loads the weights in `folder` (default: the ones shipped in the package), in eval mode, on the CPU."""
        from safetensors.torch import load_file

        folder = Path(folder) if folder is not None else WEIGHTS_DIR
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"the digits model is incomplete: {path} is missing "
                                        "(train it with `python -m parallel_backend.tiny.train`)")
        model = cls.build(json.loads(config_path.read_text()))
        tensors = load_file(str(weights_path))
        for name, module in model.modules().items():
            prefix = name + "."
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        return model.eval()
