"""VAE Decode (Multi-GPU) against the stock VAE Decode in a real ComfyUI: ComfyUI's own SD VAE (seeded), a
seeded latent, the image kept exactly (wrapped as a latent and saved by the stock SaveLatent). The decode must
split over the pool's two workers (the node says so in the log) and equal the stock node's within 1e-4 of the
image's scale; a latent the node cannot split takes the stock path, said in one sentence."""

from __future__ import annotations

import pytest
import torch


def _workflow(node: str, prefix: str, rows: int = 8, columns: int = 6, devices: str | None = "cpu:2") -> dict:
    workflow = {
        "1": {"class_type": "TandemTestSeededVAE", "inputs": {"seed": 3}},
        "2": {"class_type": "TandemTestSeededLatent", "inputs": {"seed": 4, "channels": 4, "rows": rows,
                                                                 "columns": columns}},
        "3": {"class_type": node, "inputs": {"samples": ["2", 0], "vae": ["1", 0]}},
        "4": {"class_type": "TandemTestImageAsLatent", "inputs": {"images": ["3", 0]}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": prefix}},
    }
    if node.startswith("TandemVAEDecode") and devices is not None:
        workflow["6"] = {"class_type": "TandemSettings", "inputs": {"devices": devices, "strategy": "auto",
                                                                    "cfg_degree": 0, "batch_degree": 0}}
        workflow["3"]["inputs"]["settings"] = ["6", 0]
    return workflow


def _pair(server, comfy, build, prefix: str, said: str) -> tuple:
    """The stock node's output and the Multi-GPU node's (build(node, prefix) -> a workflow), checking the log
    says `said` for the Multi-GPU run (the pool ran, in bands or tiles)."""
    stock_node = "VAEDecodeTiled" if "(Tiled)" in said else "VAEDecode" if "VAE Decode" in said else "VAEEncode"
    tandem_node = "Tandem" + stock_node
    comfy.run_checked(server, build(stock_node, f"{prefix}_stock"))
    offset = server.log_size()
    comfy.run_checked(server, build(tandem_node, f"{prefix}_tandem"))
    log = server.log_since(offset)
    assert said in log, log[-2000:]
    return server.latent(f"{prefix}_stock"), server.latent(f"{prefix}_tandem")


def test_vae_decode_in_bands_equals_the_stock_node(comfy_server, comfy):
    stock, tandem = _pair(comfy_server, comfy, _workflow, "vae",
                          "VAE Decode (Multi-GPU) split 8x6 rows into 2 bands on cpu, cpu")
    assert stock.shape == tandem.shape == (1, 64, 48, 3)
    comfy.assert_same_latents(tandem, stock)
    assert (stock - stock.mean()).abs().max() > 1e-3  # the image is not flat: the oracle can tell rows apart


def test_a_latent_of_one_row_takes_the_stock_path_and_says_why(comfy_server, comfy):
    comfy.run_checked(comfy_server, _workflow("VAEDecode", "vae_row_stock", rows=1))
    offset = comfy_server.log_size()
    comfy.run_checked(comfy_server, _workflow("TandemVAEDecode", "vae_row_tandem", rows=1))
    said = comfy_server.log_since(offset)
    assert "VAE Decode (Multi-GPU) takes the stock path: a latent of one row cannot be split into bands" in said
    torch.testing.assert_close(comfy_server.latent("vae_row_tandem"), comfy_server.latent("vae_row_stock"),
                               atol=1e-4, rtol=1e-4)


def _encode_workflow(node: str, prefix: str, wan: bool = False, video: tuple = ()) -> dict:
    """A seeded image (a video's frames with `wan`, or with `video`: (fixture, latent channels, frames, rows,
    columns)): the stock decode of a latent; then `node` encodes it."""
    flow = _workflow("VAEDecode", prefix, rows=6, columns=4)
    if wan:
        _with_vae(flow, "TandemTestSeededWanVAE", 5, 16, frames=3)
    if video:
        fixture, channels, frames, rows, columns = video
        _with_vae(flow, fixture, 5, channels, frames=frames)
        flow["2"]["inputs"].update(rows=rows, columns=columns)
    flow["4"] = {"class_type": node, "inputs": {"pixels": ["3", 0], "vae": ["1", 0]}}
    flow["5"]["inputs"]["samples"] = ["4", 0]
    if node == "TandemVAEEncode":
        flow["6"] = {"class_type": "TandemSettings", "inputs": {"devices": "cpu:2", "strategy": "auto",
                                                                "cfg_degree": 0, "batch_degree": 0}}
        flow["4"]["inputs"]["settings"] = ["6", 0]
    return flow


def test_a_wan_video_encode_in_bands_equals_the_stock_node(comfy_server, comfy):
    def workflow(node: str, prefix: str) -> dict:
        return _encode_workflow(node, prefix, wan=True)

    stock, tandem = _pair(comfy_server, comfy, workflow, "wan_encode",
                          "VAE Encode (Multi-GPU) split 48x32 rows into 2 bands on cpu, cpu")
    assert stock.shape == tandem.shape == (1, 16, 3, 6, 4)
    comfy.assert_same_latents(tandem, stock)


def test_vae_encode_in_bands_equals_the_stock_node(comfy_server, comfy):
    stock, tandem = _pair(comfy_server, comfy, _encode_workflow, "vae_encode",
                          "VAE Encode (Multi-GPU) split 48x32 rows into 2 bands on cpu, cpu")
    assert stock.shape == tandem.shape == (1, 4, 6, 4)
    comfy.assert_same_latents(tandem, stock)


def test_a_wan_video_decode_in_bands_equals_the_stock_node(comfy_server, comfy):
    """ComfyUI's Wan 2.1 VAE decodes frame by frame with a cache of the frames before: every band keeps its own."""
    def workflow(node: str, prefix: str) -> dict:
        return _with_vae(_workflow(node, prefix, rows=6, columns=4), "TandemTestSeededWanVAE", 5, 16, frames=3)

    stock, tandem = _pair(comfy_server, comfy, workflow, "wan_vae",
                          "VAE Decode (Multi-GPU) split 6x4 rows into 2 bands on cpu, cpu")
    assert stock.shape == tandem.shape == (9, 48, 32, 3)  # 3 latent frames: 1 + 2 x 4 frames
    comfy.assert_same_latents(tandem, stock)
    assert 0.01 < stock.mean() < 0.99 and stock.std() > 1e-3  # inside the clamp: the oracle can tell bands apart


def _tiled(node: str, prefix: str, wan: bool = False) -> dict:
    """VAE Decode (Tiled), stock or Multi-GPU, of a latent of many tiles (64-pixel tiles, 16 pixels of overlap;
    with `wan`, a video of 5 latent frames cut into 2-frame pieces too)."""
    flow = _workflow(node, prefix, rows=20, columns=12)
    flow["3"]["inputs"].update(tile_size=64, overlap=16, temporal_size=8, temporal_overlap=4)
    if wan:
        _with_vae(flow, "TandemTestSeededWanVAE", 5, 16, frames=5)
        flow["2"]["inputs"].update(rows=12, columns=8)
    return flow


def test_a_tiled_decode_spread_over_the_pool_equals_the_stock_tiled_node(comfy_server, comfy):
    """25 tiles: ComfyUI tiles a 20x12 latent three ways (4x16, 16x4 and 8x8 latent rows x columns, 2 of overlap)
    and averages them."""
    stock, tandem = _pair(comfy_server, comfy, _tiled, "vae_tiled",
                          "VAE Decode (Tiled) (Multi-GPU) decoded 25 tiles on cpu, cpu")
    assert stock.shape == tandem.shape == (1, 160, 96, 3)
    comfy.assert_same_latents(tandem, stock)
    assert (stock - stock.mean()).abs().max() > 1e-3


def test_a_tiled_wan_video_decode_spread_over_the_pool_equals_the_stock_tiled_node(comfy_server, comfy):
    def workflow(node: str, prefix: str) -> dict:
        return _tiled(node, prefix, wan=True)

    stock, tandem = _pair(comfy_server, comfy, workflow, "wan_tiled", "VAE Decode (Tiled) (Multi-GPU) decoded")
    assert stock.shape == tandem.shape == (17, 96, 64, 3)  # 5 latent frames: 1 + 4 x 4 frames
    comfy.assert_same_latents(tandem, stock)


def _with_vae(flow: dict, vae: str, seed: int, channels: int, frames: int = 0) -> dict:
    """The workflow with the seeded VAE fixture `vae` and a latent of `channels` (a video's `frames`)."""
    flow["1"] = {"class_type": vae, "inputs": {"seed": seed}}
    flow["2"]["inputs"].update(channels=channels, **({"frames": frames} if frames else {}))
    return flow


def _flux2(flow: dict) -> dict:
    """ComfyUI's Flux.2 VAE and a 128-channel latent (its 32 channels folded 2x2)."""
    return _with_vae(flow, "TandemTestSeededFlux2VAE", 6, 128)


def test_a_flux2_vae_decode_in_bands_equals_the_stock_node(comfy_server, comfy):
    """ComfyUI's Flux.2 VAE un-folds its latent 2x2 before decoding: each band's latent rows are whole 16-pixel
    rows of the image."""
    def workflow(node: str, prefix: str) -> dict:
        return _flux2(_workflow(node, prefix, rows=4, columns=3))

    stock, tandem = _pair(comfy_server, comfy, workflow, "flux2_vae",
                          "VAE Decode (Multi-GPU) split 4x3 rows into 2 bands on cpu, cpu")
    assert stock.shape == tandem.shape == (1, 64, 48, 3)
    comfy.assert_same_latents(tandem, stock)
    assert (stock - stock.mean()).abs().max() > 1e-3


def test_a_flux2_vae_encode_in_bands_equals_the_stock_node(comfy_server, comfy):
    def workflow(node: str, prefix: str) -> dict:
        return _flux2(_encode_workflow(node, prefix))

    stock, tandem = _pair(comfy_server, comfy, workflow, "flux2_encode",
                          "VAE Encode (Multi-GPU) split 96x64 rows into 2 bands on cpu, cpu")
    assert stock.shape == tandem.shape == (1, 128, 6, 4)
    comfy.assert_same_latents(tandem, stock)


# ComfyUI's Wan 2.2 VAE (48 latent channels, 16 pixels per latent row) and LTX-Video's (128, 32 pixels per
# latent row; 8 frames per latent frame after the first); HunyuanVideo 1.0's (16, 8 pixels per latent row) and
# 1.5's (32, 16 pixels per latent row; both 4 frames per latent frame after the first), on 5 latent rows, which
# split into bands of 3 and 2: (fixture, latent channels, frames, rows, columns)
WAN22 = ("TandemTestSeededWan22VAE", 48, 2, 4, 3)
LTX = ("TandemTestSeededLTXVAE", 128, 2, 4, 3)
HUNYUAN = ("TandemTestSeededHunyuanVideoVAE", 16, 3, 5, 3)
HUNYUAN15 = ("TandemTestSeededHunyuanVideo15VAE", 32, 3, 5, 3)
VIDEO_IDS = ["wan2.2", "ltx-video", "hunyuan-video", "hunyuan-video-1.5"]


def _video_decode(video: tuple, noise: bool = False):
    def workflow(node: str, prefix: str) -> dict:
        fixture, channels, frames, rows, columns = video
        flow = _with_vae(_workflow(node, prefix, rows=rows, columns=columns), fixture, 5, channels, frames=frames)
        if noise:
            flow["1"]["inputs"]["noise"] = True
        return flow

    return workflow


@pytest.mark.parametrize("video, frames, pixels", [(WAN22, 5, 16), (LTX, 9, 32), (HUNYUAN, 9, 8), (HUNYUAN15, 9, 16)],
                         ids=VIDEO_IDS)
def test_a_video_decode_in_bands_equals_the_stock_node(comfy_server, comfy, video, frames, pixels):
    """Wan 2.2's decoder un-patchifies 2x2 pixels at its end; LTX-Video's pads its rows by reflection and
    un-folds depth into space at each upsample; HunyuanVideo's convolutions are padded by their caller (replicated
    rows, and the frames of the chunk before); 1.5's upsamples un-fold channels into 2x2 pixels: every band keeps
    its own frames' cache."""
    _, _, _, rows, columns = video
    stock, tandem = _pair(comfy_server, comfy, _video_decode(video), f"{video[0]}_decode",
                          f"VAE Decode (Multi-GPU) split {rows}x{columns} rows into 2 bands on cpu, cpu")
    assert stock.shape == tandem.shape == (frames, rows * pixels, columns * pixels, 3)
    comfy.assert_same_latents(tandem, stock)
    assert stock.std() > 1e-3 and (stock - stock.mean()).abs().max() > 1e-2  # the oracle can tell bands apart


@pytest.mark.parametrize("video, pixels", [(WAN22, 16), (LTX, 32), (HUNYUAN, 8), (HUNYUAN15, 16)], ids=VIDEO_IDS)
def test_a_video_encode_in_bands_equals_the_stock_node(comfy_server, comfy, video, pixels):
    """HunyuanVideo 1.0's encoder halves its rows by strided convolutions; 1.5's folds 2x2 pixels into channels:
    bands start at whole latent rows."""
    fixture, channels, frames, rows, columns = video

    def workflow(node: str, prefix: str) -> dict:
        return _encode_workflow(node, prefix, video=video)

    stock, tandem = _pair(comfy_server, comfy, workflow, f"{fixture}_encode",
                          f"VAE Encode (Multi-GPU) split {rows * pixels}x{columns * pixels} rows into 2 bands on cpu, cpu")
    assert stock.shape == tandem.shape == (1, channels, frames, rows, columns)
    comfy.assert_same_latents(tandem, stock)


# ComfyUI's HunyuanImage 2.1 VAE (2D, 64 latent channels, 32 pixels per latent row) and its refiner's (3D
# convolutions, 32 channels, 16 pixels per latent row, each image one frame: `not_video`), on 5 latent rows
IMAGE21 = ("TandemTestSeededHunyuanImage21VAE", 64, 0, 5, 3)
REFINER = ("TandemTestSeededHunyuanImage21RefinerVAE", 32, 1, 5, 3)


@pytest.mark.parametrize("vae, pixels", [(IMAGE21, 32), (REFINER, 16)],
                         ids=["hunyuan-image-2.1", "hunyuan-image-2.1-refiner"])
def test_hunyuan_image_vaes_decode_and_encode_in_bands_equal_to_the_stock_nodes(comfy_server, comfy, vae, pixels):
    """Their downsamples fold 2x2 pixels into channels after a convolution, their upsamples unfold them; the
    refiner's latent has one frame, and its encoder takes each image as a one-frame video, as ComfyUI does."""
    fixture, channels, frames, rows, columns = vae
    stock, tandem = _pair(comfy_server, comfy, _video_decode(vae), f"{fixture}_decode",
                          f"VAE Decode (Multi-GPU) split {rows}x{columns} rows into 2 bands on cpu, cpu")
    assert stock.shape == tandem.shape == (1, rows * pixels, columns * pixels, 3)
    comfy.assert_same_latents(tandem, stock)
    assert stock.std() > 1e-3 and (stock - stock.mean()).abs().max() > 1e-2

    def workflow(node: str, prefix: str) -> dict:
        return _encode_workflow(node, prefix, video=vae)

    stock, tandem = _pair(comfy_server, comfy, workflow, f"{fixture}_encode",
                          f"VAE Encode (Multi-GPU) split {rows * pixels}x{columns * pixels} rows into 2 bands on cpu, cpu")
    assert stock.shape == tandem.shape == (1, channels, *((frames,) if frames else ()), rows, columns)
    comfy.assert_same_latents(tandem, stock)


def _seeded_noise(flow_of, seed: int):
    """flow_of(node, prefix) with the server's torch generator seeded right before the decode (TandemTestSeedTorch
    between the latent and the decode): the stock decode's unseeded noise draws the same at every run."""
    def workflow(node: str, prefix: str) -> dict:
        flow = flow_of(node, prefix)
        flow["7"] = {"class_type": "TandemTestSeedTorch",
                     "inputs": {"samples": ["2", 0], "vae": ["1", 0], "seed": seed}}
        flow["3"]["inputs"]["samples"] = ["7", 0]
        return flow

    return workflow


def test_ltx_videos_noise_adding_decoder_in_bands_equals_the_stock_node(comfy_server, comfy):
    """LTX-Video 0.9.1 and later's decoder is conditioned on the timestep and first mixes noise drawn over the
    whole latent into it: the host draws it as the stock decode does (the same generator), the bands decode the
    mixed latent. With the generator seeded alike before each decode, the two images agree; seeded otherwise, the
    Multi-GPU node's image moves (the noise is drawn, not skipped)."""
    _, _, _, rows, columns = LTX
    stock, tandem = _pair(comfy_server, comfy, _seeded_noise(_video_decode(LTX, noise=True), 11), "ltx_noise",
                          f"VAE Decode (Multi-GPU) split {rows}x{columns} rows into 2 bands on cpu, cpu")
    assert stock.shape == tandem.shape == (9, rows * 32, columns * 32, 3)
    comfy.assert_same_latents(tandem, stock)
    assert stock.std() > 1e-3 and (stock - stock.mean()).abs().max() > 1e-2
    comfy.run_checked(comfy_server, _seeded_noise(_video_decode(LTX, noise=True), 12)("TandemVAEDecode",
                                                                                     "ltx_noise_other"))
    assert (comfy_server.latent("ltx_noise_other") - stock).abs().max() > 1e-3


def test_ltx_091s_noise_inside_the_decoder_takes_the_stock_path_and_says_why(comfy_server, comfy):
    """LTX-Video 0.9.1's first decoder blocks add noise inside their resnets, drawn at the shape of what they get
    (a band's rows, a chunk's frames): a band cannot draw the whole's. The node decodes on the host, as the stock
    node does, seeded alike: the same image."""
    def workflow(node: str, prefix: str) -> dict:
        flow = _seeded_noise(_video_decode(LTX, noise=True), 13)(node, prefix)
        flow["1"]["inputs"]["inject_noise"] = True
        return flow

    stock, tandem = _pair(comfy_server, comfy, workflow, "ltx_inject",
                          "VAE Decode (Multi-GPU) takes the stock path: ComfyUI's LTX-Video VAE adds noise drawn at "
                          "each block's own shape inside its decoder (inject_noise, LTX-Video 0.9.1's)")
    assert stock.shape == tandem.shape == (9, 128, 96, 3)
    comfy.assert_same_latents(tandem, stock)


def _ltx_tiled(seed: int, inject_noise: bool = False):
    """VAE Decode (Tiled) of LTX-Video's noise-mixing decoder, the generator seeded with `seed` before it: a 6x5
    latent in 128-pixel tiles with 32 pixels of overlap (4x4 latent rows and columns, 1 of overlap), 4 tiles of
    4 or 3 rows x 4 or 2 columns, its 2 latent frames in one piece."""
    def flow_of(node: str, prefix: str) -> dict:
        flow = _video_decode(LTX, noise=True)(node, prefix)
        flow["2"]["inputs"].update(rows=6, columns=5)
        flow["3"]["inputs"].update(tile_size=128, overlap=32, temporal_size=16, temporal_overlap=8)
        flow["1"]["inputs"]["inject_noise"] = inject_noise
        return flow

    return _seeded_noise(flow_of, seed)


def test_ltx_videos_noise_adding_decoder_tiled_on_the_pool_equals_the_stock_tiled_node(comfy_server, comfy):
    """The stock tiled decode draws each tile's noise as it decodes it: the host draws them all, in the same order,
    by the same call, and the workers decode the mixed tiles. Seeded alike, the images agree; seeded otherwise,
    the Multi-GPU node's image moves (the noise is drawn, not skipped)."""
    stock, tandem = _pair(comfy_server, comfy, _ltx_tiled(21), "ltx_tiled",
                          "VAE Decode (Tiled) (Multi-GPU) decoded 4 tiles on cpu, cpu")
    assert stock.shape == tandem.shape == (9, 6 * 32, 5 * 32, 3)
    comfy.assert_same_latents(tandem, stock)
    assert stock.std() > 1e-3 and (stock - stock.mean()).abs().max() > 1e-2
    comfy.run_checked(comfy_server, _ltx_tiled(22)("TandemVAEDecodeTiled", "ltx_tiled_other"))
    assert (comfy_server.latent("ltx_tiled_other") - stock).abs().max() > 1e-3


def test_ltx_091s_noise_inside_the_decoder_is_tiled_on_the_host_and_says_why(comfy_server, comfy):
    """A worker decoding a whole tile of 0.9.1's decoder would draw its resnets' noise from its own generator:
    the tiled node takes the stock path, seeded alike the same image."""
    stock, tandem = _pair(comfy_server, comfy, _ltx_tiled(23, inject_noise=True), "ltx_tiled_inject",
                          "VAE Decode (Tiled) (Multi-GPU) takes the stock path: ComfyUI's LTX-Video VAE adds noise "
                          "drawn at each block's own shape inside its decoder (inject_noise, LTX-Video 0.9.1's)")
    assert stock.shape == tandem.shape == (9, 6 * 32, 5 * 32, 3)
    comfy.assert_same_latents(tandem, stock)


def test_ltx_091s_encoder_splits_though_its_decoder_adds_noise(comfy_server, comfy):
    """0.9.1's noise is its decoder's: its encoder draws none, and encodes in bands equal to the stock node."""
    _, channels, frames, rows, columns = LTX

    def workflow(node: str, prefix: str) -> dict:
        flow = _encode_workflow(node, prefix, video=LTX)
        flow["1"]["inputs"].update(noise=True, inject_noise=True)
        return flow

    stock, tandem = _pair(comfy_server, comfy, workflow, "ltx_inject_encode",
                          f"VAE Encode (Multi-GPU) split {rows * 32}x{columns * 32} rows into 2 bands on cpu, cpu")
    assert stock.shape == tandem.shape == (1, channels, frames, rows, columns)
    comfy.assert_same_latents(tandem, stock)
