"""A VAE split into a grid of tiles, rows x columns (models/vae_grid.py, models/vae_halos.py), against the same VAE
whole. Oracle: the whole decode or encode in this process; the tiles run as threads (tests/tensor_threads.py) or
on a pool of four CPU workers, and their outputs, joined, must equal it within 1e-4 of its scale. Image VAEs
(SD-shaped AutoencoderKL), causal 3D video VAEs with a frame cache (Wan 2.1, Wan 2.2) and those with replicate
padding or strided downsamples (HunyuanVideo, LTX-Video), all diffusers' own classes, tiny and seeded."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from parallel_backend.models.vae_bands import band_in_place
from parallel_backend.models.vae_grid import choose_grid, grid_shape, label, tile_ranges


_VIDEO = importlib.util.spec_from_file_location("video_families",
                                                Path(__file__).with_name("test_vae_video_families.py"))
video = importlib.util.module_from_spec(_VIDEO)
_VIDEO.loader.exec_module(video)
bands_test, threads = video.bands_test, video.threads
_decode, _encode, _close = bands_test._decode, bands_test._encode, video._close


def tiled(vae, x, grid: tuple[int, int], run, unit: int = 1, group=None):
    """run(vae, tile) on each tile of `x` (tiles of whole `unit` rows and columns), one thread per tile of `grid`,
    joined. `group`: the threads' group (default: a ThreadBands of the grid)."""
    rows, columns = x.shape[-2] // unit, x.shape[-1] // unit
    count = grid[0] * grid[1]
    group = group or threads.ThreadBands(count, grid[1])
    outs = [None] * count

    def rank(index):
        mine = copy.deepcopy(vae)
        band_in_place(mine, group.rank(index))
        r, c = tile_ranges(rows, columns, grid, index)
        with torch.inference_mode():
            outs[index] = run(mine, x[..., r.start * unit:r.stop * unit, c.start * unit:c.stop * unit])

    threads.run_threads(group.group, rank)
    lines = [torch.cat(outs[at:at + grid[1]], dim=-1) for at in range(0, count, grid[1])]
    return torch.cat(lines, dim=-2)


def test_the_grid_moves_the_fewest_halo_bytes_and_stays_rows_below_four_devices():
    assert grid_shape(64, 64, 2) == (2, 1) and grid_shape(64, 64, 3) == (3, 1)
    assert grid_shape(64, 64, 4) == (2, 2) and grid_shape(64, 96, 6) == (2, 3)
    assert grid_shape(16, 128, 4) == (1, 4) and grid_shape(128, 16, 4) == (4, 1)  # a strip cuts across
    assert grid_shape(1, 64, 4) == (1, 4) and grid_shape(2, 2, 8) is None
    assert grid_shape(6, 5, 4, equal=True) is None and grid_shape(6, 6, 4, equal=True) == (2, 2)
    assert choose_grid(2, 2, 8) == (2, 2) and choose_grid(1, 1, 4) == (1, 1) and choose_grid(3, 1, 4) == (3, 1)
    assert [tile_ranges(5, 7, (2, 2), i) for i in range(4)] == [(range(0, 3), range(0, 4)), (range(0, 3), range(4, 7)),
                                                                 (range(3, 5), range(0, 4)), (range(3, 5), range(4, 7))]
    assert (label((2, 1)), label((2, 2))) == ("bands", "grid 2x2")
    with pytest.raises(ValueError, match="cannot be split into tiles of at least one row and column"):
        choose_grid(0, 4, 4)


@pytest.mark.parametrize("grid, shape", [((2, 2), (2, 4, 7, 5)), ((2, 2), (1, 4, 8, 8)), ((2, 3), (1, 4, 5, 7)),
                                         ((1, 4), (1, 4, 3, 9))])
def test_an_sd_vae_decodes_in_a_grid_equal_to_the_whole(grid, shape):
    """Odd sizes: tiles of 4 x 3, 4 x 2, 3 x 3, 3 x 2 latent positions; without the halos the tiles differ."""
    vae = bands_test.tiny_vae()
    z = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    reference = _decode(vae, z)
    _close(tiled(vae, z, grid, _decode), reference)


def test_each_tile_of_a_2x2_grid_holds_about_a_quarter_of_the_activations():
    """The point of the grid: the tensors a tile's decode holds at its peak (counted live as they are made,
    plan/vae_count.py LiveBytes; the whole attention block's included) against the whole decode's."""
    from parallel_backend.plan.vae_count import LiveBytes

    vae = bands_test.tiny_vae()
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    peaks = []

    def held(module, x):
        with LiveBytes([*module.parameters(), *module.buffers(), x]) as live, torch.inference_mode():
            out = module.decode(x).sample
        peaks.append(max(live.peak, live.block_entry + live.block_peak))
        return out

    reference = held(vae, z)
    _close(tiled(vae, z, (2, 2), held), reference)
    whole, tiles = peaks[0], peaks[1:]
    assert len(tiles) == 4 and max(tiles) <= 0.35 * whole  # a quarter, and the halos' strips


def test_a_grid_without_its_column_halos_would_differ():
    """The oracle can fail: the same 2 x 2 tiles whose column exchange brings nothing (each tile's left and right
    edges padded as the image's) do not equal the whole."""
    vae = bands_test.tiny_vae()
    z = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    reference = _decode(vae, z)

    class NoColumns(threads.ThreadBands):
        def rank(self, index):
            band = super().rank(index)
            band.halo_columns = lambda left, right: (None, None)
            return band

    group = NoColumns(4, 2)
    assert (tiled(vae, z, (2, 2), _decode, group=group) - reference).abs().max() > 1e-2


@pytest.mark.parametrize("grid, columns", [((2, 2), 3), ((2, 2), 5), ((3, 2), 2)])
def test_an_sd_vae_encodes_in_a_grid_equal_to_the_whole(grid, columns):
    """Tiles of whole latent positions (8 image pixels each way: three padded downsamples halve them exactly,
    the zero column and row each takes from the tile right of and below it)."""
    vae = bands_test.tiny_vae()
    image = torch.randn(1, 3, 8 * 5, 8 * columns, generator=torch.Generator().manual_seed(5))
    _close(tiled(vae, image, grid, _encode, unit=8), _encode(vae, image))


@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2", "hunyuan", "ltx", "ltx-0.9.5"])
def test_a_video_vae_decodes_and_encodes_in_a_grid_equal_to_the_whole(kind):
    """2 x 2 tiles of an odd latent (7 x 5): causal 3D convolutions with each tile's own frame cache (Wan),
    replicate padding and a mid block whole (HunyuanVideo), strided and space-to-depth downsamples and
    pixel-shuffle upsamples (LTX-Video)."""
    build, frames, scale = (bands_test.tiny_wan_vae, 3, 8) if kind == "wan2.1" else video.VAES[kind]
    vae = build()
    z = torch.randn(1, 4, frames, 7, 5, generator=torch.Generator().manual_seed(8))
    reference = _decode(vae, z)
    alone = torch.cat([_decode(vae, z[..., :3]), _decode(vae, z[..., 3:])], dim=-1)
    assert (alone - reference).abs().max() > 1e-2  # tiles without halos differ
    _close(tiled(vae, z, (2, 2), _decode), reference)
    clip = torch.randn(1, 3, 5, scale * 3, scale * 5, generator=torch.Generator().manual_seed(11))  # 1 + 4 frames
    _close(tiled(vae, clip, (2, 2), _encode, unit=scale), _encode(vae, clip))


def test_one_frame_decodes_in_a_grid():
    vae = video.hunyuan_vae()
    z = torch.randn(1, 4, 1, 5, 3, generator=torch.Generator().manual_seed(3))
    _close(tiled(vae, z, (2, 2), _decode), _decode(vae, z))


@pytest.mark.parametrize("mode", ["zeros", "replicate", "reflect"])
def test_a_strided_or_edge_padded_convolution_splits_into_a_grid_exactly(mode):
    """A 3x3 convolution of stride 2 (one row and column from the tile above and on the left, none from the
    others; tiles start at even rows and columns), then one of stride 1: padding other than zeros made only at
    the image's edge, per side."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode=mode),
                              torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode=mode)).eval()
    x = torch.randn(1, 3, 12, 10)
    with torch.no_grad():
        reference = net(x)
    _close(tiled(net, x, (2, 2), lambda module, tile: module(tile), unit=2), reference)


def test_a_tile_that_does_not_hold_whole_strides_is_refused():
    vae = video.ltx_vae()
    clip = torch.randn(1, 3, 1, 32, 16 * 3, generator=torch.Generator().manual_seed(7))
    # tiles of 24 pixels' columns where the encoder needs 16-pixel ones: 3 columns left at its second halving
    with pytest.raises(ValueError, match="^a tile of 3 columns cannot be divided by a stride of 2 exactly: tiles must "
                                         "start at columns the encoder's downsampling divides$"):
        tiled(vae, clip, (2, 2), _encode, unit=8)


@pytest.mark.pool
def test_a_pool_of_four_decodes_and_encodes_in_a_2x2_grid_equal_to_one_device():
    """Four gloo workers: each holds one tile (its output's rows and columns reported back), the halos of both
    dimensions cross between the processes, and the joined image equals the whole decode here; an SD-shaped VAE
    and Wan's causal video VAE, decode and encode, odd sizes."""
    from parallel_backend.engine.pool_engine import engine_for
    from parallel_backend.engine.vae import decode, encode
    from parallel_backend.runtime.pool import WorkerPool

    vae, wan = bands_test.tiny_vae(), bands_test.tiny_wan_vae()
    z = torch.randn(2, 4, 7, 5, generator=torch.Generator().manual_seed(4))
    image = torch.randn(1, 3, 40, 24, generator=torch.Generator().manual_seed(6))
    clip = torch.randn(1, 4, 3, 6, 5, generator=torch.Generator().manual_seed(9))
    with WorkerPool("cpu:4", timeout_s=120) as pool:
        engine = engine_for(pool)
        done = decode(engine, vae, z)
        _close(done.out, _decode(vae, z))
        # 7 x 5 latent rows and columns in tiles of 4 or 3 by 3 or 2, each decoded to 4x its rows and columns
        assert done.extra["grid"] == (2, 2) and done.extra["bands"] == 4
        assert done.extra["tiles"] == {0: (16, 12), 1: (16, 8), 2: (12, 12), 3: (12, 8)}
        assert done.bytes_sent > 0 and all(b > 0 for b in done.extra["activation_peak_bytes"].values())
        rows = decode(engine, vae, z, devices=3)  # 3 devices stay bands of rows
        _close(rows.out, _decode(vae, z))
        assert rows.extra["grid"] == (3, 1) and set(rows.extra["tiles"].values()) == {(12, 20), (8, 20)}
        done = encode(engine, vae, image)  # 10 x 6 latent positions of 4 pixels
        _close(done.out, _encode(vae, image))
        assert done.extra["grid"] == (2, 2) and set(done.extra["tiles"].values()) == {(5, 3)}
        done = decode(engine, wan, clip)
        _close(done.out, _decode(wan, clip))
        assert done.extra["grid"] == (2, 2) and done.extra["tiles"][3] == (12, 8)


@pytest.mark.parametrize("grid", [(2, 2), (1, 4)])
def test_convolutions_their_caller_pads_split_into_a_grid_exactly(grid):
    """ComfyUI's CarriedConv3d (HunyuanVideo's) in a grid: the caller's replicated rows and columns at a tile's
    inner edges become the neighbours' (corners included), re-replicated at the image's edge, in the frames
    carried from the chunk before too; tiles of whole pairs of rows and columns (the second convolution halves
    both), unequal."""
    torch.manual_seed(0)
    net = bands_test.CallerPadded().eval().requires_grad_(False)
    x = torch.randn(1, 2, 5, 10, 12, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = net(x)
    _close(tiled(net, x, grid, lambda module, tile: module(tile), unit=2), reference)
