"""Writes tiny Flux, SD3 and Wan 2.1 diffusion-model files that ComfyUI's own loader (UNETLoader) detects as
the same family and config as the fixture models (fixture_nodes/families.py), and checks that it does.

Run with ComfyUI's checkout as the working directory: `python write_families.py OUT_DIR`. Each file is the
family's diffusion model as its checkpoint stores it (bare keys, bf16 or fp16), seeded as the fixture nodes
seed theirs; comfy.model_detection must infer the family's model config class and every unet_config entry
the fixture sets, so a loaded file is the fixture's model in ComfyUI's key layout. Where this host's detection
cannot infer a tiny width (v0.8 fixes Flux at 24 heads of 128 channels), it writes FILE.skip with the reason
instead, for the test to skip with.
"""

import os
import sys

import torch

from comfy.cli_args import args

args.cpu = True  # before comfy.model_management is imported: this machine may have no GPU
import comfy.model_detection  # noqa: E402
from fixture_nodes import _seeded, families  # noqa: E402  (this script's folder is on sys.path)

FILES = {"flux": ("tiny_flux.safetensors", torch.bfloat16), "sd3": ("tiny_sd3.safetensors", torch.float16),
         "wan21_t2v": ("tiny_wan21_t2v.safetensors", torch.bfloat16)}
SEED = 13


def _same(a, b) -> bool:
    return list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b


def write(family: str, path: str) -> None:
    from safetensors.torch import save_file

    model = families.fill_buffers(_seeded(families.model_config(family).get_model({}), SEED), SEED).diffusion_model
    dtype = FILES[family][1]
    state = {name: t.to(dtype).contiguous() for name, t in model.state_dict().items()}
    detected = comfy.model_detection.model_config_from_unet(state, "")
    expected_class, unet_config = families.FAMILIES[family][:2]
    assert detected is not None and type(detected).__name__ == expected_class, (family, type(detected).__name__)
    wrong = {k: (v, detected.unet_config.get(k)) for k, v in unet_config.items()
             if not _same(v, detected.unet_config.get(k))}
    if wrong:
        with open(path + ".skip", "w") as out:
            out.write(f"this ComfyUI's model detection infers another {expected_class} config from the tiny "
                      f"{family} file (fixture value, detected value): {wrong}")
        return
    save_file(state, path)


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for family, (name, _) in FILES.items():
        write(family, os.path.join(out_dir, name))


if __name__ == "__main__":
    main(sys.argv[1])
