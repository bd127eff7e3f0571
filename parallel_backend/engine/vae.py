"""A VAE decode or encode split over the pool (issue 29): each device works on a tile of the input (bands of rows
on 2 or 3 devices, a grid of rows x columns on 4 or more: models/vae_grid.py), its convolutions, norms and
attention made exact by models/vae_bands.py, and the host joins the tiles.

Host side: `decode(engine, vae, latent)` and `encode(engine, vae, image)`. Worker side: `run_band` (a handler of
the worker program), which bands its copy of the VAE once and points it at the call's group.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from ..models import vae_bands, vae_families, vae_grid
from ..models.stages import synchronize
from ..runtime.carry import CannotCarry
from ..runtime.messages import Computed
from ..runtime.portable import peak_memory_bytes, reset_peak_memory

DECODE, ENCODE = "decode", "encode"


@dataclass
class VaeBand:
    """`way` (decode or encode) `rows` (this rank's tile of the whole input) as tile `index` of `peers` (global
    ranks, in image order, row by row), `columns` tiles across (1: bands of rows)."""

    fingerprint: str
    way: str
    rows: object
    peers: tuple[int, ...]
    index: int
    timestep: object = None  # a decoder conditioned on the timestep (LTX-Video's): its value, per sample
    columns: int = 1


def decode(engine, vae, latent, devices: int | None = None, timestep=None, draw_on=None) -> Computed:
    """The image `vae` decodes from `latent` (batch, channels, rows, columns), split over `devices` of the pool
    (default: all; never more tiles than the latent has rows x columns) in bands of rows, or a grid of tiles on 4
    or more (models/vae_grid.py). out: the whole image on the latent's device; extra: compute_s,
    activation_peak_bytes and tile (the output's rows and columns) per rank, bands (the devices used), grid
    (rows, columns of tiles). `timestep`: for a decoder conditioned on it (the family's `takes_timestep`).
    `draw_on`: the device the stock decode runs on, where the family's `prepare` draws its noise over the whole
    latent (the stock's generator; default: the latent's device). Raises CannotCarry for a VAE without a family
    (the host decodes it itself, or one whose decode its family refuses, with the sentence why), ValueError before
    any work for a latent that cannot be split or a timestep the VAE does not take."""
    family = _family(vae)
    refusal = family.decode_refusal and family.decode_refusal(vae)
    if refusal:
        raise CannotCarry(refusal)
    if timestep is not None and not family.takes_timestep:
        raise ValueError(f"this {type(vae).__name__} VAE decodes without a timestep; pass none")
    vae_bands.check_noise(vae)
    return _split(engine, vae, family, latent, DECODE, 1, devices, timestep, draw_on)


def encode(engine, vae, image, devices: int | None = None) -> Computed:
    """What `vae` encodes `image` (batch, channels, rows, columns) to (the family's encode: ComfyUI's the latent,
    diffusers' the distribution's parameters), as `decode` does: tiles of whole latent rows and columns (the
    family's `scale` of image rows each)."""
    family = _family(vae)
    scale = family.scale(vae)
    if image.shape[-2] % scale or image.shape[-1] % scale:
        raise ValueError(f"an image of {image.shape[-2]}x{image.shape[-1]} pixels does not divide into the VAE's "
                         f"{scale}-pixel latent rows and columns; crop it to a multiple of {scale}")
    return _split(engine, vae, family, image, ENCODE, scale, devices)


def _family(vae):
    family = vae_families.family_of(vae)
    if family is None:
        raise CannotCarry(f"Tandem has no band split for a {type(vae).__name__} VAE")
    return family


def _split(engine, vae, family, rows_in, way: str, unit: int, devices: int | None, timestep=None,
           draw_on=None) -> Computed:
    """`way` over tiles of `unit` rows and columns of `rows_in`, one per device (`family`: the VAE's)."""
    import torch

    vae_bands.check_layers(vae)  # an unsupported layer refused before any work
    units = (rows_in.shape[-2] // unit, rows_in.shape[-1] // unit)
    with engine.job():
        engine.pool.before_job(None)  # a decode is a job of its own: a worker lost since the last one restarts the pool
        most = min(devices or engine.device_count(), engine.device_count())
        grid = vae_grid.choose_grid(*units, most, family.equal_bands)  # equal: every tile of the same shape
        fingerprint = engine.hold(vae, family.name)
        if way == DECODE and family.prepare is not None:  # once the workers hold the VAE: a refusal before leaves
            # the host's generator untouched, for the stock path to draw from
            rows_in = family.prepare(vae, rows_in.to(draw_on or rows_in.device)).to(rows_in.device)
        peers = tuple(range(grid[0] * grid[1]))
        work = {}
        for index in peers:
            rows, columns = vae_grid.tile_ranges(*units, grid, index)
            tile = rows_in[..., rows.start * unit:rows.stop * unit, columns.start * unit:columns.stop * unit]
            work[index] = VaeBand(fingerprint, way, tile.contiguous(), peers, index, timestep, grid[1])
        computed = engine.request(work, f"{way[:-1]}ing in {vae_grid.words(grid)}", collective=len(peers) > 1)
    lines = [torch.cat([computed[i].out for i in peers[at:at + grid[1]]], dim=-1) for at in peers[::grid[1]]]
    out = torch.cat(lines, dim=-2).to(rows_in.device)
    return Computed(out, max(c.compute_s for c in computed.values()), 0.0,
                    sum(c.bytes_sent for c in computed.values()),
                    {"compute_s": {r: c.compute_s for r, c in computed.items()}, "bands": len(peers), "grid": grid,
                     "tiles": {r: c.extra["tile"] for r, c in computed.items()},
                     "activation_peak_bytes": {r: c.extra["activation_peak_bytes"] for r, c in computed.items()}})


def run_band(state, message: VaeBand) -> Computed:
    """Worker side: this rank's rows of the output."""
    import torch

    vae, family_name = state.model(message.fingerprint)
    family = vae_families.family_named(family_name)
    group = vae_bands.PeerBands(message.peers, message.index, state.device, message.columns)
    bands = getattr(vae, "__dict__", {}).get("_tandem_bands")
    if bands is None:
        vae_bands.band_in_place(vae, group)
    else:
        bands.group = group
    run = family.decode if message.way == DECODE else family.encode
    if message.timestep is not None:
        run = functools.partial(run, timestep=torch.as_tensor(message.timestep).to(state.device))
    reset_peak_memory(state.device)
    before = peak_memory_bytes(state.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = run(vae, message.rows.to(state.device))
    synchronize(state.device)
    seconds = time.perf_counter() - started
    return Computed(out, seconds, 0.0, group.bytes, {"rows": out.shape[-2], "tile": tuple(out.shape[-2:]),
                                                     "activation_peak_bytes": peak_memory_bytes(state.device) - before})
