"""A tiled VAE decode spread over the pool: the host's own tiling (ComfyUI's VAE Decode (Tiled)) cuts the
latent into overlapping tiles and blends the decoded tiles; here each tile is decoded whole on one device, the
devices taking shares of the tiles balanced by size. Each tile's decode is the VAE's own, on its own input, so
the result is what one device's tiled decode gives (seams and all: tiling is the user's choice); any VAE class
the workers can hold works, with no band split needed. A VAE whose decode draws noise (ComfyUI's
timestep-conditioned LTX-Video decoder) has each tile's drawn on the host by its family's `prepare`, in the tiles'
order, as the stock tiled decode draws it tile after tile: the workers decode the mixed tiles and draw nothing.

Host side: `run_tiles(engine, module, tiles)`. Worker side: `run_tile_share` (a handler of the worker program).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from ..models import vae_families
from ..models.stages import synchronize
from ..runtime.carry import CannotCarry
from ..runtime.messages import Computed

TILES_FAMILY = "vae:tiles"  # the module is held under its own fingerprint: never the banded copy of engine/vae.py


@dataclass
class VaeTiles:
    """`way` (the module's method: "decode") of each of `tiles`, whole, on this rank; with `family` (a VAE
    family's name), that family's decode instead, of tiles its `prepare` mixed on the host."""

    fingerprint: str
    way: str
    tiles: list
    family: str | None = None


def shares(sizes: list[int], devices: int) -> list[list[int]]:
    """The tiles' indices per device: largest first, each to the device with the least work so far (ties: the
    lower rank), so that devices finish together; each share in the tiles' order."""
    load, taken = [0] * devices, [[] for _ in range(devices)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(devices), key=lambda r: (load[r], r))
        load[rank] += sizes[index]
        taken[rank].append(index)
    return [sorted(share) for share in taken]


def run_tiles(engine, module, tiles: list, way: str = "decode") -> Computed:
    """`module.<way>(tile)` for every tile, the tiles spread over the pool's devices. out: the outputs in the
    tiles' order, on the host; extra: compute_s per rank, devices (how many took tiles). A decode whose VAE family
    draws noise on the host (`prepare`) draws each tile's there, in the tiles' order, by the stock's call on the
    tile as given (its device and dtype), once the workers hold the module: a refusal before leaves the host's
    generator untouched. Raises CannotCarry where the workers cannot hold the module or its family refuses its
    decode (noise drawn inside the decoder: a worker would draw it from its own generator), the host then tiling
    it itself."""
    if not tiles:
        raise ValueError("no tiles to decode")
    family = vae_families.family_of(module) if way == "decode" else None
    refusal = family is not None and family.decode_refusal is not None and family.decode_refusal(module)
    if refusal:
        raise CannotCarry(refusal)
    drawn = family.name if family is not None and family.prepare is not None else None
    with engine.job():
        fingerprint = engine.hold(module, TILES_FAMILY)
        if drawn:
            tiles = [family.prepare(module, tile) for tile in tiles]  # in order: the stock draws tile after tile
        split = [share for share in shares([t.numel() for t in tiles], min(engine.device_count(), len(tiles)))
                 if share]
        work = {rank: VaeTiles(fingerprint, way, [tiles[i].contiguous() for i in share], drawn)
                for rank, share in enumerate(split)}
        computed = engine.request(work, f"{way[:-1]}ing {len(tiles)} tiles")
    outs = [None] * len(tiles)
    for rank, share in enumerate(split):
        for index, out in zip(share, computed[rank].out):
            outs[index] = out.to(tiles[index].device)
    return Computed(outs, max(c.compute_s for c in computed.values()), 0.0, 0,
                    {"compute_s": {r: c.compute_s for r, c in computed.items()}, "devices": len(split)})


def run_tile_share(state, message: VaeTiles) -> Computed:
    """Worker side: this rank's tiles, each through the module's `way` (or its family's decode), in order."""
    import torch

    module, _ = state.model(message.fingerprint)
    run = (getattr(module, message.way) if message.family is None else
           functools.partial(vae_families.family_named(message.family).decode, module))
    started = time.perf_counter()
    with torch.inference_mode():
        outs = [run(tile.to(state.device)) for tile in message.tiles]
    synchronize(state.device)
    return Computed(outs, time.perf_counter() - started, 0.0, 0, {"tiles": len(outs)})
