"""A VAE's convolutional network split into tiles over a group of devices, equal to one device (issue 29): bands
of rows (one column of tiles), or a grid of rows x columns of tiles (models/vae_grid.py chooses it).

Each rank runs the whole network on its own tile of the image. These layers see beyond a tile, and each is made
exact (`band_in_place` wraps the module's own layers; the rest of the network is untouched):
- a convolution that pads its rows or columns (3x3: one each side) first takes those rows and columns from its
  neighbours' tiles (models/vae_halos.py: the columns from the tiles on the left and right, then the rows from
  those above and below, joined to their own column halos, so the corners come with them); of stride 1 it runs
  on its tile as written, and the strips at an inner edge are computed again from the halo and the tile's first
  (last) rows or columns, so no copy of the tile is made; at the image's edge it pads as the whole does, per
  side (zeros, or its 'replicate' or 'reflect' padding_mode);
- a GroupNorm takes its statistics over the whole image in one small collective: each tile's count, mean and
  squared deviations from that mean per group (two passes), every tile's in its own slot of a `sum` (every
  rank's partial added in rank order, so every rank gets the same bits), combined pairwise (Chan's formula: no
  cancellation), then torch's own normalisation kernel runs with them;
- an attention block (the mid block's: every position attends to every other) runs on the whole image: its
  input's tiles are gathered (`gather_rows`, `gather_tiles`), the block runs whole on every rank, each keeps its
  own rows and columns. It runs at the network's smallest resolution, where a whole image is cheap.
- an encoder's padded downsample (a zero column right and a zero row below, then a 3x3 convolution of stride 2)
  takes, in place of that zero column, the first column of the tile on the right, then in place of the zero row
  the first row of the tile below, whether the module pads in its forward (SD's) or through a ZeroPad2d before
  the convolution (Wan's): tiles start at rows and columns the downsampling divides;
- a convolution of stride s (LTX-Video's downsamples, HunyuanVideo's) takes its `padding` rows (columns) from
  the tile above (left) and `kernel - s - padding` from the tile below (right), on tiles that start at multiples
  of s, and runs unpadded on the tile joined to them, padded only at the image's edge;
- a convolution that pads itself before it runs (HunyuanVideo's: 'replicate' padding of rows, columns and
  frames, then a convolution without padding) takes its halos from the neighbours and pads, in its own mode,
  only where the tile meets the image's edge (padding per dimension commutes with joining rows and columns);
- a convolution its caller pads (ComfyUI's CarriedConv3d, whose input `conv_carry_causal_3d` pads by one
  replicated row, column and frame, or prepends the frames of the chunk before) runs on that padded tile with its
  padded rows and columns at an inner edge replaced by the neighbours' (corners included), and re-replicated at
  the image's edge; the caller's frames are left as they are, so the cached frames it keeps are corrected in the
  same way when they are used.
Everything else (1x1 convolutions, nearest upsampling, activations, residual additions, norms over channels,
patchify and pixel-(un)shuffle reshapes whose patches do not straddle a tile: Wan 2.2's, LTX-Video's) works
position by position, so a tile computes exactly its rows and columns. Rows are the second-to-last dimension and
columns the last: a video VAE's (batch, channels, frames, rows, columns) splits the same way; its causal 3D
convolutions (which pad their frames themselves and prepend the chunk before, cache_x) take halos for the input
and for the cached frames, so each tile keeps its own cache of its own rows and columns.

A `group` is what the tiles exchange through: `PeerBands` (torch.distributed, one rank per device), or the
tests' threads (tests/tensor_threads.py). Its interface: `degree`, `index` (row by row), `halo(top, bottom)` ->
(the rows of the tile above, of the tile below; None at the image's edge), `sum(tensor)`, `gather_rows(tensor)`
-> (the whole along dim -2, this band's first row in it); a grid's also `columns` (tiles across; absent: 1),
`halo_columns(left, right)` -> (the columns of the tile on the left, on the right) and `gather_tiles(tensor)` ->
(the whole image, this tile's first row, its first column).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..runtime import primitives
from . import vae_halos

# Blocks whose every output position reads every input position: run whole on gathered rows. diffusers' VAEs
# use Attention (attention_processor), WanAttentionBlock and QwenImageAttentionBlock (per frame); ComfyUI's
# AttnBlock (ldm/modules/diffusionmodules/model.py) and AttentionBlock (ldm/wan/vae.py).
# HunyuanVideo's mid block flattens frames and rows into one sequence before its attention (a causal mask over
# frames): the whole block runs on the gathered rows.
WHOLE_BLOCKS = ("Attention", "AttnBlock", "AttentionBlock", "HunyuanVideoMidBlock3D")  # class names ending so
# Encoders' downsamples that pad their input with one zero row below and one zero column on the right, then run
# a 3x3 convolution of stride 2 without padding (diffusers' Downsample2D, ComfyUI's Downsample): on a band of an
# even number of rows, the row below is the next band's first row, not a zero (`_wrap_halving_conv`).
PADDED_DOWNSAMPLES = ("Downsample2D", "Downsample")
# Layers that add noise drawn over their input's shape (LTX-Video's decoder with inject_noise): a band cannot draw
# the whole's noise, so a decode through them is refused (`check_noise`); an encode, which never runs them, splits.
NOISE_SCALES = ("per_channel_scale1", "per_channel_scale2")
# Paddings that read only the band at the image's edge (its own rows): 'circular' would read the other edge.
EDGE_MODES = ("zeros", "constant", "replicate", "reflect")


def band_rows(total: int, degree: int, index: int) -> range:
    """The rows of band `index` of `degree` near-equal bands of `total` rows."""
    return primitives.chunk_for_rank(total, degree, index)


def check_bands(rows: int, degree: int) -> None:
    """Raises ValueError in one sentence when `rows` latent rows cannot give every band at least one row."""
    if rows < degree:
        raise ValueError(f"a latent of {rows} rows cannot be split into {degree} bands of at least one row: use "
                         f"at most {rows} devices for it")


class _Bands:
    """The state every wrapped layer of one banded module shares: its group, and how deep inside a block that
    runs whole the call is (then the wrapped layers act as the originals)."""

    def __init__(self, group):
        self.group, self.whole = group, 0
        self.wrapped: list[tuple[nn.Module, object]] = []  # (layer, its own forward before, or None): for `unband`

    @property
    def columns(self) -> int:
        """Tiles across the image (1: bands of rows)."""
        return getattr(self.group, "columns", 1)


def band_in_place(module: nn.Module, group, whole: tuple[str, ...] = WHOLE_BLOCKS, layers=None) -> nn.Module:
    """Wraps `module`'s row-mixing layers (see the module doc) to run on this rank's band with `group`. Raises
    ValueError in one sentence, before any work, for a layer it cannot band exactly (a strided convolution, or
    padding other than zeros). `whole`: the class-name endings of blocks that run on the gathered rows (a UNet
    passes none: its attentions see tokens, not rows). `layers`: what `band_layers(module, whole)` returned, for a
    caller that bands the same module at every call (its scan is skipped). `unband` undoes it."""
    if getattr(module, "_tandem_bands", None) is not None:
        raise ValueError("this module is already split into bands")
    bands = _Bands(group)
    convs, norms, whole_blocks, halved = band_layers(module, whole) if layers is None else layers
    bands.wrapped = [(layer, layer.__dict__.get("forward")) for layer in (*convs, *norms, *whole_blocks)]
    for conv in convs:
        if isinstance(conv, nn.ZeroPad2d):
            _wrap_zero_pad(conv, bands)
        elif _pads_itself(conv):
            _wrap_self_padding(conv, bands)
        elif _padded_by_caller(conv):
            _wrap_caller_padded(conv, bands)
        elif hasattr(conv, "_padding"):
            _wrap_causal_conv(conv, bands)
        else:
            (_wrap_halving_conv if id(conv) in halved else _wrap_conv)(conv, bands)
    for norm in norms:
        _wrap_group_norm(norm, bands)
    for block in whole_blocks:
        _wrap_whole(block, bands)
    module.__dict__["_tandem_bands"] = bands
    return module


def unband(module: nn.Module) -> nn.Module:
    """`module` as it was before `band_in_place`: every wrapped layer's forward restored."""
    bands = module.__dict__.pop("_tandem_bands", None)
    for layer, forward in reversed(bands.wrapped if bands is not None else []):
        if forward is None:
            layer.__dict__.pop("forward", None)
        else:
            layer.forward = forward
    return module


def band_layers(module: nn.Module, whole: tuple[str, ...] = WHOLE_BLOCKS) -> tuple[list, list, list, set]:
    """What `band_in_place` wraps: `check_layers`' three lists and the ids of the padded downsamples' convolutions."""
    return (*check_layers(module, whole), _padded_downsamples(module))


def check_noise(module: nn.Module) -> None:
    """Raises ValueError in one sentence, naming it, for a layer that adds noise drawn over its input's shape: a
    decode through it cannot split."""
    for name, layer in module.named_modules():
        noise = [attr for attr in NOISE_SCALES if getattr(layer, attr, None) is not None]
        if noise:
            raise ValueError(f"layer {name!r} ({type(layer).__name__}) adds noise drawn over its input's shape "
                             f"({noise[0]}): a band cannot draw the whole image's noise, so it is not split")


def check_layers(module: nn.Module, whole: tuple[str, ...] = WHOLE_BLOCKS) -> tuple[list, list, list]:
    """The layers a band split wraps: (convolutions that pad their rows, GroupNorms, blocks that run whole, those
    whose class name ends with one of `whole`), outside the whole blocks. Raises ValueError in one sentence for a
    layer it cannot band exactly."""
    named = [m for m in module.modules() if whole and type(m).__name__.endswith(whole)]
    inside = {id(sub) for block in named for sub in block.modules() if sub is not block}
    whole_blocks = [m for m in named if id(m) not in inside]  # outermost: HunyuanVideo's mid block, not its Attention
    halved = _padded_downsamples(module)
    # a ZeroPad2d((0, 1, 0, 1)) right before such a convolution (Wan's downsamples): the pad takes the halo
    pads = {id(pad): conv for m in module.modules() if isinstance(m, nn.Sequential)
            for pad, conv in zip(m, list(m)[1:]) if isinstance(pad, nn.ZeroPad2d)
            and tuple(pad.padding) == (0, 1, 0, 1) and isinstance(conv, nn.Conv2d) and _pads_then_halves(conv)}
    after_pads = {id(conv) for conv in pads.values()}
    padded_inside = {id(m.conv) for m in module.modules() if _pads_itself(m) or _padded_by_caller(m)}
    convs, norms = [], []
    for name, layer in module.named_modules():
        if id(layer) in inside or id(layer) in after_pads or id(layer) in padded_inside:
            continue
        if id(layer) in halved or id(layer) in pads:
            convs.append(layer)
        elif _pads_itself(layer) or _padded_by_caller(layer):
            _check_padded_outside(name, layer)
            convs.append(layer)
        elif isinstance(layer, nn.Conv3d) and hasattr(layer, "_padding"):
            if _check_causal(name, layer):
                convs.append(layer)
        elif isinstance(layer, (nn.Conv2d, nn.Conv3d)):
            _check_conv(name, layer)
            if any(map(any, halos(layer))):
                convs.append(layer)
        elif isinstance(layer, nn.GroupNorm):
            norms.append(layer)
    return convs, norms, whole_blocks


def _padded_downsamples(module: nn.Module) -> set[int]:
    """The ids of the convolutions of `module`'s padded downsamples (PADDED_DOWNSAMPLES)."""
    return {id(m.conv) for m in module.modules() if type(m).__name__ in PADDED_DOWNSAMPLES
            and isinstance(getattr(m, "conv", None), nn.Conv2d) and _pads_then_halves(m.conv)}


def row_scale(module: nn.Module, whole: tuple[str, ...] = WHOLE_BLOCKS) -> int:
    """Image rows per latent row through the convolutions: the product of the row strides of the encoder's
    downsamples (what an encoder's bands must start at multiples of; reshapes are the family's `latent_patch`).
    `whole` as `check_layers`'s."""
    return convs_row_scale(check_layers(module, whole)[0])


def convs_row_scale(convs: list) -> int:
    """`row_scale` of the convolutions `check_layers` lists."""
    scale = 1
    for layer in convs:
        scale *= 2 if isinstance(layer, nn.ZeroPad2d) else _inner_conv(layer).stride[-2]
    return scale


def halos(layer) -> tuple[tuple[int, int], tuple[int, int]]:
    """((rows from the tile above, from the tile below), (columns from the tile on the left, on the right)) one
    call of `layer`, a convolution `check_layers` lists, takes on an inner tile."""
    if isinstance(layer, nn.ZeroPad2d):
        return (0, 1), (0, 1)  # a padded downsample: the first row (column) of the tile below (on the right)
    if _pads_itself(layer) or _padded_by_caller(layer):
        (above, _), (left, _) = _outer_padding(layer)
        return _halos_of(layer.conv.kernel_size, layer.conv.stride, above, left)
    if isinstance(getattr(layer, "_padding", None), tuple):
        return (layer._padding[2],) * 2, (layer._padding[0],) * 2
    return _halos_of(layer.kernel_size, layer.stride, layer.padding[-2], layer.padding[-1])


def _halos_of(kernel: tuple, stride: tuple, above_rows: int, left_cols: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """`halos` of a convolution of `kernel` and `stride` (their last two entries: rows, columns) whose input is
    padded by `above_rows` rows above and `left_cols` columns on the left."""
    return _halo_rows(kernel[-2], stride[-2], above_rows), _halo_rows(kernel[-1], stride[-1], left_cols)


def _pads_itself(module) -> bool:
    """A module that pads its input (`time_causal_padding`, in `pad_mode`) and runs its `conv` on it
    (HunyuanVideo's causal 3D convolution)."""
    return (isinstance(getattr(module, "time_causal_padding", None), tuple) and hasattr(module, "pad_mode")
            and isinstance(getattr(module, "conv", None), (nn.Conv2d, nn.Conv3d)))


def _padded_by_caller(module) -> bool:
    """ComfyUI's CarriedConv3d of more than one row: an unpadded `conv` whose caller, `conv_carry_causal_3d`,
    pads its input by CALLER_PADDED_ROWS replicated rows above and below (a 1x1 one is called unpadded)."""
    return (type(module).__name__ == "CarriedConv3d" and isinstance(getattr(module, "conv", None), nn.Conv3d)
            and module.conv.kernel_size[-2] > 1)


CALLER_PADDED_ROWS = 1  # what conv_carry_causal_3d pads a CarriedConv3d's input with, above and below


def _outer_padding(layer) -> tuple[tuple[int, int], tuple[int, int]]:
    """((rows above, below), (columns on the left, on the right)) a convolution padded outside its `conv` gets: its
    own `time_causal_padding` (F.pad's order: left, right, top, bottom, front, back), or its caller's
    CALLER_PADDED_ROWS on every side."""
    if _pads_itself(layer):
        padding = layer.time_causal_padding
        return tuple(padding[2:4]), tuple(padding[:2])
    return (CALLER_PADDED_ROWS,) * 2, (CALLER_PADDED_ROWS,) * 2


def _inner_conv(layer):
    """The convolution a wrapped layer runs: its own `conv` where it pads for it (itself, or its caller)."""
    return layer.conv if _pads_itself(layer) or _padded_by_caller(layer) else layer


def _halo_rows(kernel: int, stride: int, above: int) -> tuple[int, int]:
    """(rows from the band above, rows from the band below) a convolution of `kernel` rows and `stride` that pads
    `above` rows above needs on a band that starts at a multiple of its stride: its first output row reads from
    `above` rows before the band, its last up to `kernel - stride - above` rows after it (3x3, stride 1: 1 and 1;
    stride 2, padding 1: 1 and 0). Columns count the same way, from the tiles on the left and right."""
    return above, max(0, kernel - stride - above)


def _banded_rows(kernel: int, stride: int, above: int, below: int) -> bool:
    """Whether a convolution that pads `above` and `below` rows keeps its rows (stride 1) or divides them by its
    stride on bands that start at multiples of it, exactly."""
    if stride == 1:
        return above == below and kernel == 2 * above + 1
    return above == below and above < kernel


DIMENSIONS = ((-2, "rows", "bands"), (-1, "columns", "tiles"))  # (dimension, its lines, what splits it)


def _check_padded_outside(name: str, layer) -> None:
    """A convolution padded outside its `conv`, by itself (`_pads_itself`, in its `pad_mode`) or by its caller
    (`_padded_by_caller`; its `conv`, were it to pad, in zeros): raises ValueError in one sentence, naming it,
    unless its `conv` takes its rows and columns from its neighbours' tiles exactly (it pads and dilates none of
    them itself, and the lines padded on each side, `_outer_padding`, fit its kernel and stride)."""
    conv, by_caller = layer.conv, not _pads_itself(layer)
    if not by_caller and layer.pad_mode not in EDGE_MODES:
        raise ValueError(f"layer {name!r} ({type(layer).__name__}) pads with {layer.pad_mode!r}: only zero, "
                         "'replicate' or 'reflect' padding splits into bands exactly")
    padded = (f"{conv.padding} after its caller's {CALLER_PADDED_ROWS} line" if by_caller
              else f"{layer.time_causal_padding} then {conv.padding}")
    for (dim, lines, parts), (before, after) in zip(DIMENSIONS, _outer_padding(layer)):
        if (conv.padding[dim] or conv.dilation[dim] != 1 or (by_caller and conv.padding_mode != "zeros")
                or not _banded_rows(conv.kernel_size[dim], conv.stride[dim], before, after)):
            raise ValueError(f"layer {name!r} ({type(layer).__name__}, kernel {conv.kernel_size}, stride "
                             f"{conv.stride}, padding {padded}) cannot take its {lines} from its neighbours' "
                             f"{parts} exactly: splitting it into {parts} is not supported yet")


def _pads_then_halves(conv) -> bool:
    """A 3x3 convolution of stride 2 without padding of its own: what a padded downsample runs after padding
    one zero row below (and one zero column right of) its input."""
    return (conv.kernel_size == (3, 3) and conv.stride == (2, 2) and tuple(conv.padding) == (0, 0)
            and conv.dilation == (1, 1) and conv.padding_mode == "zeros")


def _check_causal(name: str, conv) -> bool:
    """A video VAE's causal 3D convolution pads its frames itself and keeps the frames of the chunk before; its
    rows and columns split as a plain convolution's. Whether it pads them (then it is wrapped); ValueError if it
    cannot split."""
    explicit = isinstance(conv._padding, tuple)
    pads = []
    for dim, lines, parts in DIMENSIONS:
        before, after = ((conv._padding[2:4] if dim == -2 else conv._padding[:2]) if explicit
                         else (conv.padding[dim],) * 2)
        if (conv.stride[dim] != 1 or conv.dilation[dim] != 1 or before != after
                or conv.kernel_size[dim] != 2 * before + 1):
            raise ValueError(f"layer {name!r} ({type(conv).__name__}, kernel {conv.kernel_size}, stride {conv.stride}, "
                             f"padding {conv._padding}) does not keep its {lines}: splitting it into {parts} is not "
                             "supported yet")
        pads.append(before)
    return any(pads)


def _check_conv(name: str, conv) -> None:
    for dim, lines, parts in DIMENSIONS:
        if conv.dilation[dim] != 1:
            raise ValueError(f"layer {name!r} dilates its {lines} ({type(conv).__name__} dilation {conv.dilation}): "
                             f"splitting it into {parts} is not supported yet")
        if not isinstance(conv.padding, str) and not _banded_rows(conv.kernel_size[dim], conv.stride[dim],
                                                                  conv.padding[dim], conv.padding[dim]):
            raise ValueError(f"layer {name!r} changes the number of {lines} in a way {parts} cannot share (kernel "
                             f"{conv.kernel_size}, stride {conv.stride}, padding {conv.padding}): splitting it into "
                             f"{parts} is not supported yet")
    if conv.padding_mode not in EDGE_MODES or isinstance(conv.padding, str):
        raise ValueError(f"layer {name!r} pads with {conv.padding_mode!r} (padding {conv.padding!r}): only numeric "
                         "zero, 'replicate' or 'reflect' padding splits into bands exactly")


def _wrap_zero_pad(pad: nn.ZeroPad2d, bands: _Bands) -> None:
    """A downsample's ZeroPad2d((0, 1, 0, 1)) on a tile: right of the tile the first column of the tile on the
    right, and below it the first row of the tile below (zeros at the image's edge), so the halving convolution
    after it sees the whole image's rows and columns."""
    original = pad.forward

    def forward(x):
        if bands.whole:
            return original(x)
        x = torch.cat([x, _next_line(x[..., :1], -1, bands)], dim=-1)
        return torch.cat([x, _next_line(x[..., :1, :], -2, bands)], dim=-2)

    pad.forward = forward


def _next_line(first, dim: int, bands: _Bands):
    """The first row (dim -2) or column (dim -1) of the tile below (on the right), given this tile's `first`,
    which goes up (left); zeros at the image's edge, and for columns on bands of rows."""
    group = bands.group
    if dim == -1 and bands.columns == 1:
        return torch.zeros_like(first)
    swap = group.halo if dim == -2 else group.halo_columns
    _, after = swap(first, first.narrow(dim, 0, 0))  # nothing goes down (right): an empty message is skipped
    return torch.zeros_like(first) if after is None else after


def _wrap_halving_conv(conv, bands: _Bands) -> None:
    """A padded downsample's convolution on a tile: the zero column its module padded right of the tile becomes
    the first column of the tile on the right, then the zero row below the first row of the tile below (both stay
    zero at the image's edge). The tile's rows (and, in a grid, columns) must be even."""
    original = conv.forward

    def forward(x, *args, **kwargs):
        if bands.whole:
            return original(x, *args, **kwargs)
        for dim, lines, parts in DIMENSIONS[:1 if bands.columns == 1 else 2]:
            if (x.shape[dim] - 1) % 2:
                raise ValueError(f"a {parts[:-1]} of {x.shape[dim] - 1} {lines} cannot be halved exactly: {parts} must "
                                 f"start at {lines} the encoder's downsampling divides")
        x = torch.cat([x[..., :-1], _next_line(x[..., :1], -1, bands)], dim=-1) if bands.columns > 1 else x
        return original(torch.cat([x[..., :-1, :], _next_line(x[..., :1, :], -2, bands)], dim=-2), *args, **kwargs)

    conv.forward = forward


def _wrap_causal_conv(conv, bands: _Bands) -> None:
    """A causal 3D convolution (it prepends the frames of the chunk before, `cache_x`, or a list's entry, and pads
    its frames itself): the input and the cached frames each take their halos from the neighbours' tiles, and it
    runs as `vae_halos.exact` says. Both forms are met: the padding in an explicit `_padding` tuple (diffusers,
    ComfyUI v0.8) or in the convolution's `padding` (ComfyUI v0.24)."""
    original = conv.forward
    (rows, _), (columns, _) = halos(conv)

    def forward(x, *args, **kwargs):
        if bands.whole:
            return original(x, *args, **kwargs)
        cache_x = args[0] if args else kwargs.get("cache_x")
        cache_list = args[1] if len(args) > 1 else kwargs.get("cache_list")
        if cache_list is not None:  # as the convolution itself takes it: the list's entry, then cleared
            index = args[2] if len(args) > 2 else kwargs.get("cache_idx")
            cache_x, cache_list[index] = cache_list[index], None
        inputs = (x,) if cache_x is None else (x, cache_x.to(x.device))
        around = [vae_halos.neighbours(t, (rows, rows), (columns, columns), bands.group) for t in inputs]
        return vae_halos.exact(original, inputs, around, (rows, columns))

    conv.forward = forward


def _wrap_conv(conv, bands: _Bands) -> None:
    """The convolution takes its rows and columns from the neighbours' tiles and pads them (zeros, or its
    'replicate' or 'reflect' `padding_mode`) only at the image's edge; its frames as written. Of stride 1 it runs
    as `vae_halos.exact` says (no copy of the tile); strided, on the tile joined to the halos `halos` counts."""
    original = conv.forward
    needs, stride = halos(conv), (conv.stride[-2], conv.stride[-1])
    padding = (conv.padding[-2], conv.padding[-1])

    def forward(x, *args, **kwargs):
        if bands.whole:
            return original(x, *args, **kwargs)
        around = vae_halos.neighbours(x, *needs, bands.group, stride)
        if stride == (1, 1):
            return vae_halos.exact(lambda t: original(t, *args, **kwargs), (x,), [around], padding)
        return vae_halos.padded_at_edges(conv, original, x, around, *args, **kwargs)

    conv.forward = forward


def _wrap_self_padding(layer, bands: _Bands) -> None:
    """A convolution that pads its input itself (in its `pad_mode`: HunyuanVideo's replicates) and then runs
    unpadded: its rows and columns come from the neighbours' tiles, and it pads them only at the image's edge
    (frames as written). Padding is per dimension, so joining the halos first gives the whole's padded values."""
    conv, padding = layer.conv, tuple(layer.time_causal_padding)
    needs, stride = halos(layer), (conv.stride[-2], conv.stride[-1])
    original = layer.forward

    def forward(x):
        if bands.whole:
            return original(x)
        around = vae_halos.neighbours(x, *needs, bands.group, stride)
        return conv(F.pad(vae_halos.slab(x, *around), vae_halos.edge_padding(padding, around), mode=layer.pad_mode))

    layer.forward = forward


def _wrap_caller_padded(layer, bands: _Bands) -> None:
    """A convolution whose caller padded the tile (CarriedConv3d) by one replicated line at each side: a padded
    column at an inner edge becomes the neighbour's last (first) column, then a padded row at an inner edge the
    row of the tile above (below) joined to that tile's own column halos, corners included; where the tile meets
    the image's edge the padded lines are replicated again from their new values. That is what the whole image's
    padding holds there (replicate padding is per dimension: its frames match). The padded input is the
    caller's own tensor (a new one at every call), so its lines are replaced in place."""
    pad, conv = CALLER_PADDED_ROWS, layer.conv
    (above, below), (before, after) = halos(layer)
    stride = (conv.stride[-2], conv.stride[-1])
    original = layer.forward

    def forward(x):
        if bands.whole:
            return original(x)
        across = bands.columns > 1
        _check_padded(layer, x, -2)
        if across:
            _check_padded(layer, x, -1)
        inner = x[..., pad:x.shape[-2] - pad, pad:x.shape[-1] - pad] if across else x[..., pad:x.shape[-2] - pad, :]
        left, right, upper, lower = vae_halos.neighbours(inner, (above, below), (before, after) if across else (0, 0),
                                                         bands.group, stride)
        rows = slice(pad, x.shape[-2] - pad)
        if left is not None:
            x[..., rows, :pad] = left
        if right is not None and after:  # a strided one never reads the padded line below (on the right)
            x[..., rows, x.shape[-1] - pad:] = right
        first = pad if across and left is None else 0  # the columns a halo row from a neighbour covers
        last = x.shape[-1] - (pad if across and (right is None or not after) else 0)
        end = x.shape[-2] - pad
        for halo, lines, edge in ((upper, slice(0, pad), slice(pad, pad + 1)),
                                  (lower if below else None, slice(end, None), slice(end - 1, end))):
            if halo is None:
                if across:  # the image's top (bottom) edge: the padded row replicated from the new columns too
                    x[..., lines, :] = x[..., edge, :]
                continue
            x[..., lines, first:last] = halo
            if first:  # the image's left (right) edge: its corner replicated from the new row
                x[..., lines, :first] = x[..., lines, first:first + 1]
            if last < x.shape[-1]:
                x[..., lines, last:] = x[..., lines, last - 1:last]
        return original(x)

    layer.forward = forward


def _check_padded(layer, x, dim: int) -> None:
    """RuntimeError unless `x` is padded along `dim` by one replicated line at each side, as ComfyUI's
    conv_carry_causal_3d pads a CarriedConv3d's input (else its lines would be overwritten)."""
    pad, size = CALLER_PADDED_ROWS, x.shape[dim]
    if not (torch.equal(x.narrow(dim, 0, pad), x.narrow(dim, pad, pad))
            and torch.equal(x.narrow(dim, size - pad, pad), x.narrow(dim, size - 2 * pad, pad))):
        lines = "row above and below" if dim == -2 else "column left and right"
        raise RuntimeError(f"a {type(layer).__name__}'s input is not padded by {pad} replicated {lines}, as "
                           "ComfyUI's conv_carry_causal_3d pads it: this VAE cannot be split into bands")


def _wrap_group_norm(norm: nn.GroupNorm, bands: _Bands) -> None:
    """GroupNorm over the whole image in one small collective: each band's count, mean and squared deviations per
    group (`_band_moments`), combined in rank order (`_combined_moments`), then torch's own normalisation kernel
    with those statistics, the input viewed as one sample of batch x channels (no centred copy is held)."""
    original = norm.forward

    def forward(x):
        if bands.whole:
            return original(x)
        mean, var = _combined_moments(_band_moments(x, norm.num_groups), bands.group)
        per_channel = x.shape[1] // norm.num_groups
        dtype = norm.weight.dtype if norm.affine else x.dtype  # torch's kernel takes the statistics so
        mean, var = (t.repeat_interleave(per_channel, dim=1).reshape(-1).to(dtype) for t in (mean, var))
        weight, bias = ((None, None) if not norm.affine else
                        (norm.weight.repeat(x.shape[0]), norm.bias.repeat(x.shape[0])))
        out = F.batch_norm(x.reshape(1, -1, *x.shape[2:]), mean, var, weight, bias, False, 0.0, norm.eps)
        return out.reshape(x.shape)

    norm.forward = forward


CHUNK_ELEMENTS = 1 << 20  # the squared deviations are taken this many elements at a time (a few MiB, in cache)


def _band_moments(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(3, batch, groups) float64: this band's count, mean and sum of squared deviations from it, per group (two
    passes, the second a group at a time so its scratch stays small)."""
    flat = x.reshape(x.shape[0], groups, -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    mean = flat.sum(-1) / flat.shape[-1]
    step = max(1, CHUNK_ELEMENTS // (flat.shape[0] * flat.shape[-1]))
    norms = torch.cat([torch.linalg.vector_norm(part - m[..., None], dim=-1)
                       for part, m in zip(flat.split(step, dim=1), mean.split(step, dim=1))], dim=1).double()
    squares = norms * norms
    count = torch.full_like(squares, flat.shape[-1])
    return torch.stack([count, mean.double(), squares])


def _combined_moments(moments: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole image's (mean, variance) per group from every band's `_band_moments`, by Chan's pairwise
    combination (no cancellation, unlike a mean of squares less the squared mean), in rank order so every rank
    gets the same bits. The bands' moments travel in one sum: each band fills its own slot of zeros."""
    slots = moments.new_zeros((group.degree, *moments.shape))
    slots[group.index] = moments
    every = group.sum(slots)
    count, mean, squares = every[0]
    for n, m, m2 in every[1:]:
        total = count + n
        delta = m - mean
        mean, squares, count = mean + delta * (n / total), squares + m2 + delta * delta * (count * n / total), total
    return mean, squares / count


def _wrap_whole(block: nn.Module, bands: _Bands) -> None:
    """The block runs on the whole image (its input's tiles gathered), and hands on this tile's rows and columns."""
    original = block.forward

    def forward(x, *args, **kwargs):
        if bands.whole:
            return original(x, *args, **kwargs)
        if bands.columns > 1:
            whole, row, column = bands.group.gather_tiles(x)
        else:
            (whole, row), column = bands.group.gather_rows(x), 0
        bands.whole += 1
        try:
            out = original(whole, *args, **kwargs)
        finally:
            bands.whole -= 1
        return out[..., row:row + x.shape[-2], column:column + x.shape[-1]]

    block.forward = forward


class PeerBands:
    """Tiles over torch.distributed: the ranks `peers` (global ranks; this one is peers[index]) in image order, row
    by row, `columns` tiles across (1: bands of rows), each exchanging halos with the tiles above, below and (in a
    grid) on its left and right. Messages pair in issue order (NCCL): every rank posts the same exchanges in the
    same order, as the network's layers run."""

    def __init__(self, peers: tuple[int, ...], index: int, device, columns: int = 1):
        self.peers, self.index, self.degree, self.device = tuple(peers), index, len(peers), torch.device(device)
        self.columns = columns
        self.bytes = 0

    def halo(self, top: torch.Tensor, bottom: torch.Tensor):
        """(the rows the tile above sends down, those the tile below sends up); `top` goes up, `bottom` down."""
        up = self.index - self.columns if self.index >= self.columns else None
        down = self.index + self.columns if self.index + self.columns < self.degree else None
        return self._swap(up, down, top, bottom)

    def halo_columns(self, left: torch.Tensor, right: torch.Tensor):
        """(the columns the tile on the left sends, those the tile on the right sends); `left` goes left."""
        at = self.index % self.columns
        return self._swap(self.index - 1 if at > 0 else None, self.index + 1 if at < self.columns - 1 else None,
                          left, right)

    def _swap(self, before, after, first: torch.Tensor, last: torch.Tensor):
        """`first` to tile `before`, `last` to tile `after` (None: no tile there); what each sends back."""
        before, after = (None if t is None else self.peers[t] for t in (before, after))
        sends = [(peer, t) for peer, t in ((before, first), (after, last)) if peer is not None]
        # the tile before sends its last lines (shaped as this tile's last), the tile after its first lines
        receives = [(peer, tuple(t.shape), t.dtype) for peer, t in ((before, last), (after, first)) if peer is not None]
        buffers, handles = primitives.exchange(sends, receives, self.device)
        primitives.wait_all(handles)
        self.bytes += sum(t.numel() * t.element_size() for _, t in sends)
        received = iter(buffers)
        return (next(received) if before is not None else None), (next(received) if after is not None else None)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        every = self._all_gather(tensor.contiguous().reshape(-1))
        out = every[0]
        for part in every[1:]:  # in rank order: the same bits on every rank
            out = out + part
        return out.reshape(tensor.shape)

    def gather_rows(self, band: torch.Tensor) -> tuple[torch.Tensor, int]:
        whole, row, _ = self.gather_tiles(band)
        return whole, row

    def gather_tiles(self, tile: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(the whole image joined from every tile, this tile's first row and first column in it)."""
        shapes = self._all_gather(torch.tensor(tile.shape[-2:] if self.columns > 1 else tile.shape[-2:-1],
                                               dtype=torch.int64, device=self.device))
        shapes = [(int(s[0]), int(s[-1]) if self.columns > 1 else tile.shape[-1]) for s in shapes]
        height, width = max(h for h, _ in shapes), max(w for _, w in shapes)
        padded = F.pad(tile, (0, width - tile.shape[-1], 0, height - tile.shape[-2]))
        pieces = self._all_gather(padded.contiguous().reshape(-1))
        tiles = [piece.reshape(padded.shape)[..., :h, :w] for piece, (h, w) in zip(pieces, shapes)]
        lines = [torch.cat(tiles[i:i + self.columns], dim=-1) for i in range(0, self.degree, self.columns)]
        at = self.index - self.index % self.columns
        return (torch.cat(lines, dim=-2), sum(shapes[i][0] for i in range(self.index % self.columns, at, self.columns)),
                sum(w for _, w in shapes[at:self.index]))

    def _all_gather(self, flat: torch.Tensor) -> list[torch.Tensor]:
        whole = primitives.finish_all_gather(primitives.start_all_gather(flat, list(self.peers), self.index,
                                                                         self.device))
        self.bytes += flat.numel() * flat.element_size() * (self.degree - 1)
        return list(whole.reshape(self.degree, -1))
