"""What a VAE decode split into tiles (models/vae_bands.py: bands of rows on 2 or 3 devices, a grid of rows x
columns on 4 or more, models/vae_grid.py) costs on N devices: its time and its memory per device. Pure arithmetic on a `VaeDecode` (the figures of one decode on one device, counted on the meta device
by plan/vae_count.py) and a one-device time (measured, or counted FLOPs over a GPU's throughput).

time on N devices = the largest tile's compute (the part that splits, in proportion to its rows x columns: every
tile runs the whole network on its own) + the whole-run blocks' compute (the attention every rank runs whole on the
gathered input) + every halo exchange (not overlapped with the compute: vae_bands posts and waits for each before
its convolution) + every small collective (1 all-gather per GroupNorm call: every band's count, mean and squared
deviations per group, each band in its own slot of N; 2 per
whole-block gather: the bands' heights, then the rows) + the host's transfers (the latent's bands out, the image's
rows back) + the host's overhead per call. An all-gather is N-1 point-to-point messages from each rank
(runtime/primitives.py start_all_gather): N-1 latencies. A halo: the busiest band sends its edge rows to both
neighbours (one at the image's edge): 2 messages; in a grid the busiest tile sends its edge columns to its left
and right, then its edge rows (as wide as the tile and its column halos) up and down: 4. A grid moves
(c - 1) x (columns from the left + from the right) x the image's rows, and (r - 1) x (rows from above + from
below) x (the image's columns + (c - 1) x the columns of both column halos), per convolution (`grid_halo_bytes`:
exact for the convolutions that pad; an encoder's padded downsamples, not in a decode, carry a line more per
tile). One device: the whole decode, no exchange.

memory per device = the weights (whole on every device) + the larger of the band's activations (the one-device
peak outside the whole blocks x the band's share of the rows) and, while a whole block runs, the band's share of
what is held at its entry + the block's own working set (its output and intermediates, on one device) + the
gathered whole input.

Left out: compute slower on narrower bands (smaller kernels reach less of a GPU's peak; a CPU's contention,
measured with every device computing, is applied where given), the wait at each exchange for the slower band (on
busy CPU cores far more than a link latency: `tandem bench --stage vae` on the loaded 2-core development VM
measured 0.66-0.88x where 1.3x was predicted), halo or gather transfers hiding behind compute (they would make it
faster), a PCIe tree whose devices share one uplink, the halo rows' extra buffers, allocator slack, cuDNN
workspaces and the CUDA context, the decode's first call (cuDNN's algorithm search). The halos are counted
analytically from each padded convolution's input shape, recorded by a hook in a meta run (plan/vae_count.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..models.vae_grid import grid_shape
from .links import Link

F64 = 8  # bytes of each sum a GroupNorm's all-gathers carry (vae_bands sums in float64)
MOMENTS = 3  # per group, what a GroupNorm's all-gather carries of each band: count, mean, squared deviations


@dataclass(frozen=True)
class VaeDecode:
    """One decode on one device. flops: the whole decode's; whole_flops: of them, the blocks every rank runs
    whole (attention); rows: the latent's rows (the bands split them); halos: per padded convolution call,
    (bytes of one band edge's rows, neighbours it goes to: 2, or 1 for an encoder's halving downsample);
    norms: per GroupNorm call outside the whole blocks, the bytes of its per-group sums (batch x groups x 8);
    whole_inputs: per whole-block call, its whole input's bytes; weight_bytes; activation_bytes: the peak
    held outside the whole blocks (activations only); whole_entry_bytes, whole_working_bytes: held at a whole
    block's entry, and what the block adds while it runs (the larger over its calls); latent_bytes,
    image_bytes: what the host sends and receives; columns: the latent's columns, tiles: per padded convolution
    call, (bytes per row and column position of its input, with a causal convolution's cached frames; rows;
    columns; (rows from above, from below); (columns from the left, from the right)), for a grid (both left out:
    bands of rows only)."""

    flops: int
    whole_flops: int
    rows: int
    halos: tuple = ()
    norms: tuple = ()
    whole_inputs: tuple = ()
    weight_bytes: int = 0
    activation_bytes: int = 0
    whole_entry_bytes: int = 0
    whole_working_bytes: int = 0
    latent_bytes: int = 0
    image_bytes: int = 0
    columns: int = 0
    tiles: tuple = ()

    @property
    def banded_flops(self) -> int:
        return self.flops - self.whole_flops

    def halo_bytes(self, devices: int, grid: tuple[int, int] | None = None) -> int:
        """Bytes every halo exchange of one decode moves between the devices, all tiles together (`grid`: rows x
        columns of tiles; default: bands of rows)."""
        if grid is not None and grid[1] > 1:
            return sum(grid_halo_bytes(tile, grid) for tile in self.tiles)
        return (devices - 1) * sum(edge * ways for edge, ways in self.halos) if devices > 1 else 0

    def grid(self, devices: int) -> tuple[int, int]:
        """(rows, columns) of tiles on `devices` devices (models/vae_grid.py). ValueError, in one sentence, where
        the latent has too few rows (and columns)."""
        shape = grid_shape(self.rows, self.columns, devices) if self.columns and self.tiles else None
        if shape is None and (devices < 1 or self.rows < devices):
            raise ValueError(f"a latent of {self.rows} rows cannot be split into {devices} bands of at least one row")
        return shape or (devices, 1)

    def collectives(self) -> int:
        """The small collectives of one decode on more than one device: 1 per GroupNorm call, 2 per whole
        block's gather."""
        return len(self.norms) + 2 * len(self.whole_inputs)


def grid_halo_bytes(tile: tuple, grid: tuple[int, int]) -> int:
    """Bytes one convolution call's halos (a VaeDecode.tiles entry) move between the tiles of `grid`: the columns
    across each of its c - 1 cuts, then the rows across each of its r - 1, as wide as the tiles and their column
    halos."""
    position, rows, columns, (above, below), (left, right) = tile
    r, c = grid
    across = (c - 1) * (left + right)  # columns the column halos add to each row of tiles
    return position * (across * rows + (r - 1) * (above + below) * (columns + across))


@dataclass(frozen=True)
class VaePrediction:
    """A banded decode on `devices` devices, predicted: seconds and its parts (host_seconds: the host's
    transfers and its per-call overhead), the speed-up over one device, the bytes moved between devices, the
    memory per device (weights + activations)."""

    devices: int
    seconds: float
    speedup: float
    band_seconds: float
    whole_seconds: float
    halo_seconds: float
    collective_seconds: float
    host_seconds: float
    peer_bytes: int
    weight_bytes: int
    activation_bytes: int
    grid: tuple = (1, 1)  # rows x columns of tiles

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    @property
    def exchange_seconds(self) -> float:
        return self.halo_seconds + self.collective_seconds + self.host_seconds

    def as_json(self) -> dict:
        return {"devices": self.devices, "predicted_seconds": self.seconds, "predicted_speedup": self.speedup,
                "band_seconds": self.band_seconds, "whole_seconds": self.whole_seconds,
                "halo_seconds": self.halo_seconds, "collective_seconds": self.collective_seconds,
                "host_seconds": self.host_seconds, "peer_bytes": self.peer_bytes,
                "memory_bytes_per_device": self.memory_bytes, "weight_bytes": self.weight_bytes,
                "activation_bytes": self.activation_bytes, "grid": list(self.grid)}


def band_share(rows: int, devices: int) -> float:
    """The largest band's share of the rows (vae_bands.band_rows: near-equal bands)."""
    return math.ceil(rows / devices) / rows


def _swap_seconds(link: Link, before: int, after: int, line_bytes: float, neighbours: int) -> float:
    """The busiest tile's halo exchange along one dimension: `before` lines to the tile before it and `after` to
    the one after (only the larger where it has one neighbour), each `line_bytes`."""
    sizes = [n for n in ((before, after) if neighbours >= 2 else (max(before, after),)) if n]
    return link.seconds(sum(sizes) * line_bytes, len(sizes)) if sizes and neighbours else 0.0


def predict_decode(decode: VaeDecode, one_device_s: float, link: Link, devices: int, overhead_s: float = 0.0,
                   contention: float = 1.0) -> VaePrediction:
    """`decode` in tiles on `devices` devices joined by `link` (bands of rows, or on 4 or more the grid
    models/vae_grid.py chooses where `decode` counts its columns), from one device's time for the whole decode
    (split between the part that splits and the whole blocks in proportion to their FLOPs); overhead_s: the
    host's per-call cost, paid by a split decode only; contention: how much slower a device computes while every
    device computes (plan/probe.py; 1.0: not at all), applied to a split decode's compute. ValueError, in one
    sentence, where the latent has fewer rows (and columns) than devices."""
    grid = decode.grid(devices)
    rate = one_device_s / decode.flops if decode.flops else 0.0
    whole_s = decode.whole_flops * rate
    if devices == 1:
        activations = max(decode.activation_bytes, decode.whole_entry_bytes + decode.whole_working_bytes)
        return VaePrediction(1, one_device_s, 1.0, one_device_s - whole_s, whole_s, 0.0, 0.0, 0.0, 0,
                             decode.weight_bytes, activations)
    others = devices - 1
    share = band_share(decode.rows, grid[0]) * (band_share(decode.columns, grid[1]) if grid[1] > 1 else 1.0)
    band_s = decode.banded_flops * rate * share * contention
    whole_s *= contention
    if grid[1] == 1:
        ways = min(2, others)  # a middle band has two neighbours
        halo_s = sum(link.seconds(edge * min(ways, to), min(ways, to)) for edge, to in decode.halos)
        shapes = 1  # a band's height, before its rows
    else:
        halo_s = sum(_swap_seconds(link, *columns, position * math.ceil(rows / grid[0]), grid[1] - 1)
                     + _swap_seconds(link, *above, position * (math.ceil(width / grid[1]) + sum(columns)), grid[0] - 1)
                     for position, rows, width, above, columns in decode.tiles)
        shapes = 2  # a tile's height and width
    moments = [MOMENTS * devices * sums for sums in decode.norms]  # each rank's piece: every band's slot
    norm_s = sum(link.seconds(piece * others, others) for piece in moments)
    gather_s = sum(link.seconds(shapes * F64 * others, others) + link.seconds(math.ceil(size * share) * others, others)
                   for size in decode.whole_inputs)
    host_s = link.seconds(decode.latent_bytes, devices) + link.seconds(decode.image_bytes, devices)
    seconds = band_s + whole_s + halo_s + norm_s + gather_s + host_s + overhead_s
    pieces = moments + [shapes * F64 + math.ceil(size * share) for size in decode.whole_inputs]
    peer = decode.halo_bytes(devices, grid) + devices * others * sum(pieces)  # each rank's piece to every other
    largest_input = max(decode.whole_inputs, default=0)
    activations = max(int(decode.activation_bytes * share),
                      int(decode.whole_entry_bytes * share) + decode.whole_working_bytes + largest_input
                      if decode.whole_inputs else 0)
    return VaePrediction(devices, seconds, one_device_s / seconds, band_s, whole_s, halo_s, norm_s + gather_s,
                         host_s + overhead_s, peer, decode.weight_bytes, activations, grid)
