"""ComfyUI's own VAE classes split into a 2 x 2 grid of tiles (models/vae_grid.py) in this process, against the
same VAE whole: its AutoencoderKL (SD-shaped, narrow), Wan 2.1's WanVAE and Wan 2.2's (causal 3D convolutions
with ComfyUI's frame cache, a ZeroPad2d before each halving, patchified pixels), HunyuanVideo 1.0's and 1.5's
(convolutions their caller pads), seeded. The tiles run as threads
(tests/tensor_threads.py, through tests/test_vae_grid.py); decode and encode of odd sizes must equal the whole
within 1e-4 of its scale. (The nodes on a pool: test_vae.py.)"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

_GRID = importlib.util.spec_from_file_location("vae_grid_tests", Path(__file__).parents[1] / "test_vae_grid.py")
grid_tests = importlib.util.module_from_spec(_GRID)
_GRID.loader.exec_module(grid_tests)


@pytest.fixture(scope="module")
def comfy_vaes(comfy_server):
    sys.path[:0] = [os.environ["COMFYUI_PATH"], str(Path(__file__).parent)]
    from comfy.cli_args import args

    args.cpu = True
    import comfy.ldm.wan.vae2_2 as wan22
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.wan.vae import WanVAE
    from fixture_nodes import TandemTestSeededHunyuanVideo15VAE, TandemTestSeededHunyuanVideoVAE, _seeded

    from parallel_backend.models.benchmodels_vae import seed_wan_weights

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    wan = {"z_dim": 4, "dim_mult": [1, 2, 2], "num_res_blocks": 1, "attn_scales": [],
           "temperal_downsample": [False, True], "dropout": 0.0}
    # (build, the latent's shape, the image's (frames,) latent rows and columns): 1 + 4 frames for a video
    return {"sd": (lambda: _seeded(AutoencoderKL(ddconfig=ddconfig, embed_dim=4), 3), (1, 4, 7, 5), (5, 7)),
            "wan2.1": (lambda: seed_wan_weights(WanVAE(dim=8, image_channels=3, **wan), 3), (1, 4, 3, 7, 5),
                       (5, 5, 7)),
            "wan2.2": (lambda: seed_wan_weights(wan22.WanVAE(dim=16, **wan), 3), (1, 4, 3, 7, 5), (5, 5, 3)),
            # convolutions padded by their caller (conv_carry_causal_3d): replicated rows and columns, carried frames
            "hunyuan-video": (lambda: _module(TandemTestSeededHunyuanVideoVAE), (1, 16, 2, 5, 5), (5, 5, 5)),
            "hunyuan-video-1.5": (lambda: _module(TandemTestSeededHunyuanVideo15VAE), (1, 32, 2, 5, 5), (5, 3, 5))}


def _module(fixture):
    """The module a seeded fixture's comfy.sd.VAE decodes with, in float32."""
    return fixture().build(3)[0].first_stage_model.float()


@pytest.mark.parametrize("kind", ["sd", "wan2.1", "wan2.2", "hunyuan-video", "hunyuan-video-1.5"])
def test_comfyuis_vaes_decode_and_encode_in_a_grid_equal_to_the_whole(comfy_vaes, kind):
    from parallel_backend.models.vae_families import family_of

    build, latent, image = comfy_vaes[kind]
    vae = build().eval()
    family = family_of(vae)
    assert family is not None
    scale = family.scale(vae)
    z = torch.randn(latent, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = family.decode(vae, z)
    grid_tests._close(grid_tests.tiled(vae, z, (2, 2), family.decode), reference)
    frames = image[:-2]  # a video's frames, or none
    x = torch.randn(1, 3, *frames, scale * image[-2], scale * image[-1], generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        reference = family.encode(vae, x)
    grid_tests._close(grid_tests.tiled(vae, x, (2, 2), family.encode, unit=scale), reference)
