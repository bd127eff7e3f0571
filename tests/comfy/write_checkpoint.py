"""Writes a small diffusion-model file that ComfyUI's own loader (UNETLoader) detects as SD1.5, and a LoRA for it.

Run with ComfyUI's checkout as the working directory: `python write_checkpoint.py UNET.safetensors LORA.safetensors`.
ComfyUI's detection reads SD1.5 from the state dict's widths (320 channels, a 768-wide text context, no ADM
input, attention projections as convolutions), so two levels with one res block each are enough: about 20x
smaller than SD1.5, saved in fp16 like a real checkpoint. Weights are seeded random values, filled as
the fixture nodes fill theirs.
"""

import sys

import torch

from comfy.cli_args import args

args.cpu = True  # before comfy.model_management is imported: this machine may have no GPU
import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel  # noqa: E402
import comfy.ops  # noqa: E402
from fixture_nodes import _seeded  # noqa: E402  (this script's folder is on sys.path)

SMALL_SD15_UNET = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [1, 1],
    "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1, "context_dim": 768, "num_heads": 8, "use_spatial_transformer": True,
    "use_linear_in_transformer": False, "legacy": False, "use_checkpoint": False, "dtype": torch.float32,
}


def main(unet_path: str, lora_path: str) -> None:
    from safetensors.torch import save_file

    model = _seeded(openaimodel.UNetModel(**SMALL_SD15_UNET, operations=comfy.ops.disable_weight_init), 11)
    assert not list(model.buffers()), "every state entry is a parameter that _seeded fills"
    save_file({name: p.to(torch.float16).contiguous() for name, p in model.state_dict().items()}, unet_path)
    generator = torch.Generator().manual_seed(12)
    rank = 8  # a LoRA on the time embedding's first layer (320 -> 1280), in ComfyUI's lora_unet_ key format
    save_file({"lora_unet_time_embed_0.lora_up.weight": torch.randn(1280, rank, generator=generator) * 0.3,
               "lora_unet_time_embed_0.lora_down.weight": torch.randn(rank, 320, generator=generator) * 0.3},
              lora_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
