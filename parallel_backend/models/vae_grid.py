"""A VAE's latent cut into a grid of tiles, rows x columns, one per device (issue 29): which grid, and which rows
and columns each tile holds. The halos, norms and whole blocks that make a tile exact are models/vae_bands.py's.

On 2 or 3 devices the grid is bands of rows (one column). On 4 or more it is the factorisation of the device
count that moves the fewest halo bytes for the latent's shape: a cut between two rows of tiles carries about the
image's width, one between two columns of tiles its height, so a grid of r x c tiles moves about
(r - 1) x columns + (c - 1) x rows per convolution. Ties keep more rows (fewer, wider tiles: longer runs in
memory). Tiles are numbered row by row: tile `index` is at row `index // c`, column `index % c`.
"""

from __future__ import annotations

from ..runtime import primitives

FEWEST_FOR_COLUMNS = 4  # on fewer devices, bands of rows: a grid of 1 x 2 or 1 x 3 is rows turned on their side


def grid_shape(rows: int, columns: int, devices: int, equal: bool = False) -> tuple[int, int] | None:
    """(rows of tiles, columns of tiles) for `devices` tiles of a latent of `rows` x `columns` units (a unit: one
    latent row or column, or the encoder's whole stride), every tile at least one unit each way; with `equal`,
    only a grid that cuts both ways into equal tiles. None where no grid of exactly `devices` tiles fits."""
    shapes = [(devices // c, c) for c in range(1, devices + 1) if devices % c == 0]
    if devices < FEWEST_FOR_COLUMNS:
        shapes = shapes[:1]
    fits = [(r, c) for r, c in shapes if r <= rows and c <= columns
            and not (equal and (rows % r or columns % c))]
    if not fits:
        return None
    return min(fits, key=lambda shape: ((shape[0] - 1) * columns + (shape[1] - 1) * rows, shape[1]))


def choose_grid(rows: int, columns: int, devices: int, equal: bool = False) -> tuple[int, int]:
    """`grid_shape` on the most devices up to `devices` for which one fits. ValueError in one sentence where not
    even one device fits (an empty latent)."""
    for count in range(devices, 0, -1):
        shape = grid_shape(rows, columns, count, equal)
        if shape is not None:
            return shape
    raise ValueError(f"a latent of {rows}x{columns} cannot be split into tiles of at least one row and column")


def tile_ranges(rows: int, columns: int, grid: tuple[int, int], index: int) -> tuple[range, range]:
    """(the rows, the columns) of tile `index` of `grid` over `rows` x `columns` units: near-equal, contiguous."""
    across = grid[1]
    return (primitives.chunk_for_rank(rows, grid[0], index // across),
            primitives.chunk_for_rank(columns, across, index % across))


def label(grid: tuple[int, int]) -> str:
    """How the bench names a split: 'bands' (one column), else 'grid 2x2'."""
    return "bands" if grid[1] == 1 else f"grid {grid[0]}x{grid[1]}"


def words(grid: tuple[int, int]) -> str:
    """How a sentence names a split: 'bands of rows', else 'a grid of 2x2 tiles'."""
    return "bands of rows" if grid[1] == 1 else f"a grid of {grid[0]}x{grid[1]} tiles"
