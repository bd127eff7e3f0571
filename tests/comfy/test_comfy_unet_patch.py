"""patch in ComfyUI's own UNetModel (models/unet_patch.py), as tests/test_unet_patch.py checks diffusers' UNet:
the narrow SD1.x and SDXL UNets of the fixture nodes (ComfyUI's classes, seeded weights) run in two bands on two
gloo processes against the whole UNet in this process. Needs COMFYUI_PATH (ComfyUI imported in-process; no
server)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
sys.path.insert(0, str(Path(__file__).parents[1]))
from test_unet_patch import Inputs, check_against_whole  # noqa: E402 (the tests folder, put on the path above)


def comfy_inputs(name: str) -> Inputs:
    """The fixture nodes' narrow UNet `name` ("sd1": 3 downsamples, "sdxl": 2 and the ADM vector `y`; "-control":
    with seeded ControlNet residuals for every input block and the middle block), a latent of 32 x 16."""
    sys.path[:0] = [COMFYUI_PATH, str(Path(__file__).parent)]
    from comfy.cli_args import args

    args.cpu = True
    from fixture_nodes import FAMILIES, _seeded

    from parallel_backend.models.comfy_unet import forward
    from parallel_backend.runtime.calls import ModelCall

    family, _, control = name.partition("-")
    config_class, unet_config = FAMILIES[family]
    unet = _seeded(config_class(dict(unet_config)).get_model({}), 3).diffusion_model.eval()
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 32, 16, generator=generator)
    text = torch.randn(1, 77, unet_config["context_dim"], generator=generator)
    y = torch.randn(1, unet_config["adm_in_channels"], generator=generator) if unet_config["adm_in_channels"] else None

    residuals = _residuals(unet, noise, text, y, generator) if control else None

    def call(x, t, c):
        extras = {"transformer_options": {}, **({"y": y.expand(x.shape[0], -1)} if y is not None else {})}
        if residuals is not None and x.shape == noise.shape:  # new lists at every call: the UNet pops them
            extras["control"] = {kind: list(tensors) for kind, tensors in residuals.items()}
        return ModelCall(x, t.reshape(1).expand(x.shape[0]).float(), c, extras)

    return Inputs(unet, noise, text, call, forward)


def _residuals(unet, x, text, y, generator) -> dict:
    """A ControlNet's residuals as the UNet takes them, shaped as each input block's and the middle block's output:
    {"input": [last block's, ..., first block's], "middle": [...]} (the UNet pops from the end)."""
    shapes = []  # the blocks' layers are called one by one (forward_timestep_embed): hook each block's last
    hooks = [block[-1].register_forward_hook(lambda m, args, out: shapes.append(out.shape))
             for block in (*unet.input_blocks, unet.middle_block)]
    try:
        with torch.inference_mode():
            unet(x, torch.tensor([500.0]), context=text, y=y, transformer_options={})
    finally:
        for hook in hooks:
            hook.remove()
    made = [0.3 * torch.randn(shape, generator=generator) for shape in shapes]
    return {"input": made[-2::-1], "middle": made[-1:]}


@pytest.mark.pool
@pytest.mark.parametrize("name", ["sd1", "sdxl", "sd1-control"])
def test_patch_in_comfy_unets_against_the_whole(gloo_ranks, tmp_path, name):
    if not COMFYUI_PATH:
        pytest.skip("COMFYUI_PATH is not set: this test builds ComfyUI's own UNetModel")
    print(name, check_against_whole(gloo_ranks, tmp_path, name, "comfy/test_comfy_unet_patch.py:comfy_inputs",
                                    comfy_inputs(name)))
