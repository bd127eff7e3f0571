"""A tiled decode's tiles spread over the pool (engine/vae_tiles.py): every tile's output equals the module's
own on one device, in the tiles' order, and both workers take a share balanced by size. (The ComfyUI node that
uses it is tested against the stock VAE Decode (Tiled) in tests/comfy/test_vae.py.)"""

from __future__ import annotations

import pytest
import torch

from parallel_backend.engine.vae_tiles import shares


def test_shares_balance_the_tiles_by_size_and_keep_each_share_in_order():
    sizes = [64, 64, 16, 64, 16, 32]
    taken = shares(sizes, 2)
    assert sorted(i for share in taken for i in share) == list(range(len(sizes)))
    assert all(share == sorted(share) for share in taken)
    assert [sum(sizes[i] for i in share) for share in taken] == [128, 128]
    assert shares([5], 3) == [[0], [], []]  # more devices than tiles: the others take none


@pytest.fixture(scope="module")
def cpu_pool():
    from parallel_backend.runtime.pool import WorkerPool

    with WorkerPool("cpu:2") as pool:
        yield pool


@pytest.mark.pool
def test_the_pool_decodes_every_tile_as_one_device_would(cpu_pool):
    from parallel_backend.engine.pool_engine import engine_for
    from parallel_backend.engine.vae_tiles import run_tiles

    torch.manual_seed(0)
    module = torch.nn.Conv2d(4, 3, 3, padding=1).eval()
    generator = torch.Generator().manual_seed(1)
    tiles = [torch.randn(1, 4, h, w, generator=generator) for h, w in ((8, 8), (8, 4), (4, 8), (8, 8), (6, 2))]
    done = run_tiles(engine_for(cpu_pool), module, tiles, way="forward")
    with torch.inference_mode():
        for tile, out in zip(tiles, done.out, strict=True):
            torch.testing.assert_close(out, module(tile), atol=1e-6, rtol=1e-6)
    assert done.extra["devices"] == 2 and set(done.extra["compute_s"]) == {0, 1}  # both workers decoded tiles
    with pytest.raises(ValueError, match="no tiles"):
        run_tiles(engine_for(cpu_pool), module, [])
