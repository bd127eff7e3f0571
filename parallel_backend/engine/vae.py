"""A VAE decode split over the pool (issue 29): each device decodes a band of the latent's rows, its
convolutions, norms and attention made exact by models/vae_bands.py, and the host joins the image's rows.

Host side: `decode(engine, vae, latent)`. Worker side: `decode_band` (a handler of the worker program), which
bands the worker's copy of the VAE once and points it at the call's group.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..models import vae_bands, vae_families
from ..models.stages import synchronize
from ..runtime.carry import CannotCarry
from ..runtime.messages import Computed
from ..runtime.portable import peak_memory_bytes, reset_peak_memory


@dataclass
class DecodeBand:
    """Decode `latent` (this rank's rows of the whole latent) as band `index` of `peers` (global ranks, in image
    order)."""

    fingerprint: str
    latent: object
    peers: tuple[int, ...]
    index: int


def decode(engine, vae, latent, devices: int | None = None) -> Computed:
    """The image `vae` decodes from `latent` (batch, channels, [frames,] rows, columns), its rows split over
    `devices` of the pool (default: all; never more bands than the latent has rows). out: the whole image on the
    latent's device; compute_s per rank and bytes_sent in extra. Raises CannotCarry for a VAE without a family
    (the host decodes it itself), ValueError before any work for a latent that cannot be split."""
    family = vae_families.family_of(vae)
    if family is None:
        raise CannotCarry(f"Tandem has no band split for a {type(vae).__name__} VAE")
    vae_bands.check_layers(family.banded(vae))  # an unsupported layer refused before any work
    import torch

    with engine.job():
        degree = min(devices or engine.device_count(), engine.device_count(), latent.shape[-2])
        vae_bands.check_bands(latent.shape[-2], degree)
        fingerprint = engine.hold(vae, family.name)
        peers = tuple(range(degree))
        work = {}
        for index in peers:
            rows = vae_bands.band_rows(latent.shape[-2], degree, index)
            work[index] = DecodeBand(fingerprint, latent[..., rows.start:rows.stop, :].contiguous(), peers, index)
        computed = engine.request(work, "decoding the latent in bands", collective=degree > 1)
    out = torch.cat([computed[index].out for index in peers], dim=-2).to(latent.device)
    return Computed(out, max(c.compute_s for c in computed.values()), 0.0,
                    sum(c.bytes_sent for c in computed.values()),
                    {"compute_s": {r: c.compute_s for r, c in computed.items()}, "bands": degree,
                     "activation_peak_bytes": {r: c.extra["activation_peak_bytes"] for r, c in computed.items()}})


def decode_band(state, message: DecodeBand) -> Computed:
    """Worker side: this rank's rows of the image."""
    import torch

    vae, family_name = state.model(message.fingerprint)
    family = vae_families.family_named(family_name)
    group = vae_bands.PeerBands(message.peers, message.index, state.device)
    part = family.banded(vae)
    bands = getattr(part, "__dict__", {}).get("_tandem_bands")
    if bands is None:
        vae_bands.band_in_place(part, group)
    else:
        bands.group = group
    reset_peak_memory(state.device)
    before = peak_memory_bytes(state.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = family.decode(vae, message.latent.to(state.device))
    synchronize(state.device)
    seconds = time.perf_counter() - started
    return Computed(out, seconds, 0.0, group.bytes, {"rows": out.shape[-2],
                                                     "activation_peak_bytes": peak_memory_bytes(state.device) - before})
