"""The halos a VAE's tile takes from its neighbours before a convolution, and the convolution run exactly on the
tile with them (models/vae_bands.py wraps the layers; models/vae_grid.py chooses the tiles).

A tile's neighbours: the tiles on its left and right (same rows of the image) and above and below (same columns).
The columns come first: the tile takes the last columns of the tile on its left and the first of the one on its
right; then the rows, from the tile above and below, each joined to the columns that tile took from its own
sides, so the corners come with them and no diagonal message is needed. On bands of rows (one column of tiles)
no column moves and a band's rows are the tile's.

Two ways to run a convolution on the tile with its halos:
- stride 1 (`exact`): the convolution runs on the tile as written (padded at every side as the whole is at its
  edges), then its strips at an inner edge are computed again on a thin slab of the halo and the tile's first
  (last) rows or columns, run as written too, and cut out of the slab's output: the padding then falls on the
  halo's own outputs, which are dropped. No copy of the tile is made;
- strided (`padded_at_edges`): the tile is joined to its halos, padded as the whole only where it meets the image's
  edge, and the convolution runs unpadded on it (tiles start at multiples of the stride).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

ROWS, COLUMNS = ("band", "rows", "bands"), ("tile", "columns", "tiles")  # how a refusal names each dimension


def neighbours(x, rows: tuple[int, int], columns: tuple[int, int], group, stride: tuple[int, int] = (1, 1)):
    """(left, right, upper, lower) of tile `x`: the last columns[0] columns of the tile on the left, the first
    columns[1] of the tile on the right, the last rows[0] rows of the tile above and the first rows[1] of the tile
    below (those two as wide as that tile joined to its left and right halos); None at the image's edge, for a
    dimension that needs none, and for columns on a group of bands (`group.columns`, default 1). `stride`: (rows,
    columns) a tile must hold whole multiples of, but the last."""
    across = getattr(group, "columns", 1)
    left = right = upper = lower = None
    if across > 1 and any(columns):
        _check(x.shape[-1], columns, stride[1], group.index % across < across - 1, COLUMNS)
        # the tile on the left takes this tile's first columns (its right halo), the one on the right its last
        left, right = group.halo_columns(x[..., :columns[1]], x[..., x.shape[-1] - columns[0]:])
    if any(rows):
        _check(x.shape[-2], rows, stride[0], group.index < group.degree - across, ROWS)
        upper, lower = group.halo(across_columns(x, left, right, slice(0, rows[1])),
                                  across_columns(x, left, right, slice(x.shape[-2] - rows[0], None)))
    return left, right, upper, lower


def _check(size: int, needs: tuple[int, int], stride: int, more_after: bool, words) -> None:
    tile, lines, tiles = words
    if size < max(needs):
        raise ValueError(f"a {tile} of {size} {lines} cannot give its neighbours the {max(needs)} {lines} a "
                         "convolution needs: use fewer devices for this image")
    if size % stride and more_after:
        raise ValueError(f"a {tile} of {size} {lines} cannot be divided by a stride of {stride} exactly: {tiles} "
                         f"must start at {lines} the encoder's downsampling divides")


def across_columns(x, left, right, rows: slice = slice(None)):
    """`rows` of `x` joined to the same rows of its left and right halos (either None: none there)."""
    parts = [t[..., rows, :] for t in (left, x, right) if t is not None]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def slab(x, left, right, upper, lower):
    """`x` joined to all its halos: the columns, then the rows (with their corners)."""
    middle = across_columns(x, left, right)
    parts = [t for t in (upper, middle, lower) if t is not None]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def exact(run, inputs: tuple, halos: list, pads: tuple[int, int]):
    """run(*inputs), a stride-1 convolution padding `pads` = (rows, columns) at each side, on this tile, equal to
    the whole's rows and columns there. `halos`: each input's `neighbours` (a causal convolution's inputs, the
    chunk and its cached frames, are cut alike). A tile under twice the padding runs once on its whole slab."""
    rows, columns = pads
    x = inputs[0]
    left, right, upper, lower = halos[0]
    height, width = x.shape[-2], x.shape[-1]
    first = columns if left is not None else 0  # where the tile's columns start in a slab joined to its halos
    if height < 2 * rows or width < 2 * columns:
        out = run(*(slab(t, *h) for t, h in zip(inputs, halos)))
        top = rows if upper is not None else 0
        return out[..., top:top + height, first:first + width]
    out = run(*inputs)
    if left is not None:
        out[..., :columns] = run(*(torch.cat([h[0], t[..., :2 * columns]], dim=-1)
                                   for t, h in zip(inputs, halos)))[..., columns:2 * columns]
    if right is not None:
        out[..., width - columns:] = run(*(torch.cat([t[..., width - 2 * columns:], h[1]], dim=-1)
                                           for t, h in zip(inputs, halos)))[..., columns:2 * columns]
    if upper is not None:
        out[..., :rows, :] = run(*(torch.cat([h[2], across_columns(t, h[0], h[1], slice(0, 2 * rows))], dim=-2)
                                   for t, h in zip(inputs, halos)))[..., rows:2 * rows, first:first + width]
    if lower is not None:
        out[..., height - rows:, :] = run(*(torch.cat([across_columns(t, h[0], h[1], slice(height - 2 * rows, None)),
                                                       h[3]], dim=-2)
                                            for t, h in zip(inputs, halos)))[..., rows:2 * rows, first:first + width]
    return out


def padded_at_edges(conv, original, x, halos, *args, **kwargs):
    """`original` (conv's forward) on `x` joined to its `halos` (left, right, upper, lower), the rows and columns
    padded (zeros, or the convolution's 'replicate' or 'reflect' padding_mode) only at a side without a halo: the
    image's edge. Frames are padded as written."""
    edges = [h is None for h in halos]  # left, right, top, bottom
    x = slab(x, *halos)
    padding, modes = conv.padding, conv._reversed_padding_repeated_twice
    if conv.padding_mode == "zeros":
        x = F.pad(x, (padding[-1] * edges[0], padding[-1] * edges[1], padding[-2] * edges[2], padding[-2] * edges[3]))
        conv.padding = (*padding[:-2], 0, 0)
    else:  # (columns, columns, rows, rows, ...): what the padding mode pads
        conv._reversed_padding_repeated_twice = [m * edge for m, edge in zip(modes[:4], edges)] + list(modes[4:])
    try:
        return original(x, *args, **kwargs)
    finally:
        conv.padding, conv._reversed_padding_repeated_twice = padding, modes


def edge_padding(padding: tuple, halos) -> tuple:
    """`padding` (columns, columns, rows, rows, ...: F.pad's order) with no padding at a side that has a halo."""
    return (*(0 if h is not None else p for p, h in zip(padding[:4], halos)), *padding[4:])
