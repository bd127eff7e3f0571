"""VAE Decode (Tiled) (Multi-GPU): the stock tiled decode, its tiles decoded on the pool's devices
(parallel_backend/engine/vae_tiles.py) instead of one after the other on one.

ComfyUI's own tiling code runs twice, unchanged, with the VAE's `decode` stood in for: the first run only
collects the tiles it cuts (in order; its blend of stand-in outputs is thrown away), the pool decodes them all at
once, and the second run blends the decoded tiles exactly as the stock node would. So the image is the stock
node's, for any VAE the workers can hold. ComfyUI's timestep-conditioned LTX-Video decoder mixes noise into each
tile first: the host draws it, tile after tile in the first run's order, by the stock's own call and generator
(engine/vae_tiles.py), so a run seeded alike equals the stock node's. A VAE the pool cannot take, one that draws
noise inside its decoder (LTX-Video 0.9.1's), an audio VAE (one dimension), or a latent that fits one tile takes
the stock path, said in one sentence. The host holds every decoded tile at once before the blend (a 2D decode
tiles the image three ways: about three times the image, plus the overlaps).
"""

from __future__ import annotations

from contextlib import contextmanager

import nodes as comfy_nodes  # ComfyUI's own top-level nodes.py (VAEDecodeTiled), not this pack's nodes/
import torch
from comfy_api.latest import io

from parallel_backend.engine.vae_tiles import run_tiles

from .settings import settings_input
from .vae import on_the_pool


class TandemVAEDecodeTiled(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TandemVAEDecodeTiled",
            display_name="VAE Decode (Tiled) (Multi-GPU) (Tandem)",
            category="latent/multi-gpu",
            description="VAE Decode (Tiled) whose tiles are decoded on several devices at once (the stock tiled "
                        "image, sooner).",
            inputs=[io.Latent.Input("samples", tooltip="The latent to decode."),
                    io.Vae.Input("vae", tooltip="The VAE that decodes it; its tiles are spread over the devices "
                                                "of the settings."),
                    io.Int.Input("tile_size", default=512, min=64, max=4096, step=32),
                    io.Int.Input("overlap", default=64, min=0, max=4096, step=32),
                    io.Int.Input("temporal_size", default=64, min=8, max=4096, step=4,
                                 tooltip="Only used for video VAEs: Amount of frames to decode at a time."),
                    io.Int.Input("temporal_overlap", default=8, min=4, max=4096, step=4,
                                 tooltip="Only used for video VAEs: Amount of frames to overlap."),
                    settings_input()],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples, vae, tile_size, overlap=64, temporal_size=64, temporal_overlap=8,
                settings=None) -> io.NodeOutput:
        def stock():
            return comfy_nodes.VAEDecodeTiled().decode(vae, samples, tile_size, overlap, temporal_size,
                                                       temporal_overlap)

        model = vae.first_stage_model
        tiles = _tiles_of(vae, stock) if samples["samples"].ndim > 3 else None
        reason = ("an audio VAE's one-dimensional latent is tiled on one device" if tiles is None else
                  "the latent fits one tile: nothing to spread" if len(tiles) < 2 else None)
        done = on_the_pool("VAE Decode (Tiled)", settings, reason, lambda engine: run_tiles(engine, model, tiles),
                           lambda done, pool: f"decoded {len(tiles)} tiles on "
                                              f"{', '.join(pool.devices[:done.extra['devices']])}")
        if done is None:
            return io.NodeOutput(*stock())
        decoded = iter(zip(tiles, done.out))

        def replay(tile):
            cut, out = next(decoded)
            if cut.shape != tile.shape:  # the stock code cut other tiles the second time: never blend those
                raise RuntimeError(f"VAE Decode (Tiled) (Multi-GPU): the tiling changed between its two runs "
                                   f"(a {tuple(tile.shape)} tile where {tuple(cut.shape)} was decoded)")
            return out

        with _decode_as(model, replay):
            images = stock()
        if next(decoded, None) is not None:
            raise RuntimeError("VAE Decode (Tiled) (Multi-GPU): the tiling changed between its two runs (fewer "
                               "tiles the second time)")
        return io.NodeOutput(*images)


def _tiles_of(vae, stock) -> list:
    """The tiles the stock tiled decode cuts, in its order: its code run with a decode that keeps each tile and
    answers zeros of the decoded tile's shape (the scale ComfyUI's tiling computes the image's size with)."""
    tiles = []

    def keep(tile):
        tiles.append(tile)
        channels = getattr(vae, "output_channels", 3) if tile.ndim > 4 else 3  # 2D tiling's output: 3 channels
        return torch.zeros(tile.shape[0], channels, *(_scaled(vae.upscale_ratio, d, n)
                                                      for d, n in enumerate(tile.shape[2:])))

    with _decode_as(vae.first_stage_model, keep):
        stock()
    return tiles


def _scaled(ratio, dim: int, size: int) -> int:
    """A tile's decoded size along `dim`, as ComfyUI's tiled_scale_multidim sizes it."""
    scale = ratio[dim] if isinstance(ratio, (tuple, list)) else ratio
    return round(scale(size) if callable(scale) else scale * size)


@contextmanager
def _decode_as(model, decode):
    """`model.decode` is `decode` within the block (an attribute of the instance; what was there before, after)."""
    before = model.__dict__.get("decode")
    model.decode = decode
    try:
        yield
    finally:
        if before is None:
            del model.decode
        else:
            model.decode = before
