"""A VAE's convolutional network split into bands of rows over a group of devices, equal to one device (issue 29).

Each rank runs the whole network on its own band of the image's rows. These layers see beyond a band, and each
is made exact (`band_in_place` wraps the module's own layers; the rest of the network is untouched):
- a convolution that pads its rows (3x3: one row above and below) first takes those rows from its neighbours'
  bands (`halo`); it runs on its band as written, and the rows at an inner edge are computed again from the
  halo and the band's first (last) rows without row padding, so no copy of the band is made; at the image's
  edge it pads as the whole does (zeros, or its 'replicate' or 'reflect' padding_mode);
- a GroupNorm takes its statistics over the whole image in one small collective: each band's count, mean and
  squared deviations from that mean per group (two passes), every band's in its own slot of a `sum` (every
  rank's partial added in rank order, so every rank gets the same bits), combined pairwise (Chan's formula: no
  cancellation), then torch's own normalisation kernel runs with them;
- an attention block (the mid block's: every position attends to every other) runs on the whole image: its
  input's bands are gathered (`gather_rows`), the block runs whole on every rank, each keeps its own rows.
  It runs at the network's smallest resolution, where a whole image is cheap.
- an encoder's padded downsample (a zero row below, then a 3x3 convolution of stride 2) takes, in place of that
  zero row, the first row of the band below, whether the module pads in its forward (SD's) or through a
  ZeroPad2d before the convolution (Wan's): bands start at rows the downsampling divides;
- a convolution of stride s over rows (LTX-Video's downsamples, HunyuanVideo's) takes its `padding` rows from
  the band above and `kernel - s - padding` from the band below, on bands that start at multiples of s;
- a convolution that pads itself before it runs (HunyuanVideo's: 'replicate' padding of rows, columns and
  frames, then a convolution without padding) takes its halos from the neighbours and pads, in its own mode,
  only where the band meets the image's edge (padding per dimension commutes with joining rows);
- a convolution its caller pads (ComfyUI's CarriedConv3d, whose input `conv_carry_causal_3d` pads by one
  replicated row, column and frame, or prepends the frames of the chunk before) runs on that padded band with its
  first and last rows replaced by the rows of the bands above and below, where there are such bands; the caller's
  padding is left as it is, so the cached frames it keeps are corrected in the same way when they are used.
Everything else (1x1 convolutions, nearest upsampling, activations, residual additions, norms over channels,
patchify and pixel-(un)shuffle reshapes whose patches do not straddle a band: Wan 2.2's, LTX-Video's) works row
by row, so a band computes exactly its rows. Rows are the second-to-last dimension: a video VAE's (batch,
channels, frames, rows, columns) bands the same way; its causal 3D convolutions (which pad their frames
themselves and prepend the chunk before, cache_x) take halos for the input and for the cached frames, so each
band keeps its own cache of its own rows.

A `group` is what the bands exchange through: `PeerBands` (torch.distributed, one rank per device), or the
tests' threads (tests/tensor_threads.py). Its interface: `degree`, `index`, `halo(top, bottom)` -> (the rows
of the band above, of the band below; None at the image's edge), `sum(tensor)`, `gather_rows(tensor)` -> (the
whole along dim -2, this band's first row in it).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from ..runtime import primitives

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
# the whole's noise.
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
        noise = [attr for attr in NOISE_SCALES if getattr(layer, attr, None) is not None]
        if noise:
            raise ValueError(f"layer {name!r} ({type(layer).__name__}) adds noise drawn over its input's shape "
                             f"({noise[0]}): a band cannot draw the whole image's noise, so it is not split")
        if id(layer) in halved or id(layer) in pads:
            convs.append(layer)
        elif _pads_itself(layer):
            _check_self_padding(name, layer)
            convs.append(layer)
        elif _padded_by_caller(layer):
            _check_caller_padded(name, layer)
            convs.append(layer)
        elif isinstance(layer, nn.Conv3d) and hasattr(layer, "_padding"):
            if _check_causal(name, layer):
                convs.append(layer)
        elif isinstance(layer, (nn.Conv2d, nn.Conv3d)):
            _check_conv(name, layer)
            if any(_halo_rows(layer.kernel_size[-2], layer.stride[-2], layer.padding[-2])):
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


def halo_rows(layer) -> tuple[int, int]:
    """(rows from the band above, rows from the band below) one call of `layer`, a convolution `check_layers`
    lists, takes on an inner band."""
    if isinstance(layer, nn.ZeroPad2d):
        return 0, 1  # a padded downsample: the first row of the band below (its convolution's halos say the same)
    if _pads_itself(layer):
        return _halo_rows(layer.conv.kernel_size[-2], layer.conv.stride[-2], layer.time_causal_padding[2])
    if _padded_by_caller(layer):
        return _halo_rows(layer.conv.kernel_size[-2], layer.conv.stride[-2], CALLER_PADDED_ROWS)
    if isinstance(getattr(layer, "_padding", None), tuple):
        return layer._padding[2], layer._padding[2]
    return _halo_rows(layer.kernel_size[-2], layer.stride[-2], layer.padding[-2])


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


def _inner_conv(layer):
    """The convolution a wrapped layer runs: its own `conv` where it pads for it (itself, or its caller)."""
    return layer.conv if _pads_itself(layer) or _padded_by_caller(layer) else layer


def _halo_rows(kernel: int, stride: int, above: int) -> tuple[int, int]:
    """(rows from the band above, rows from the band below) a convolution of `kernel` rows and `stride` that pads
    `above` rows above needs on a band that starts at a multiple of its stride: its first output row reads from
    `above` rows before the band, its last up to `kernel - stride - above` rows after it (3x3, stride 1: 1 and 1;
    stride 2, padding 1: 1 and 0)."""
    return above, max(0, kernel - stride - above)


def _banded_rows(kernel: int, stride: int, above: int, below: int) -> bool:
    """Whether a convolution that pads `above` and `below` rows keeps its rows (stride 1) or divides them by its
    stride on bands that start at multiples of it, exactly."""
    if stride == 1:
        return above == below and kernel == 2 * above + 1
    return above == below and above < kernel


def _check_self_padding(name: str, layer) -> None:
    conv, (_, _, above, below, *_) = layer.conv, layer.time_causal_padding
    if layer.pad_mode not in EDGE_MODES:
        raise ValueError(f"layer {name!r} ({type(layer).__name__}) pads with {layer.pad_mode!r}: only zero, "
                         "'replicate' or 'reflect' padding splits into bands exactly")
    if conv.padding[-2] or conv.dilation[-2] != 1 or not _banded_rows(conv.kernel_size[-2], conv.stride[-2], above,
                                                                       below):
        raise ValueError(f"layer {name!r} ({type(layer).__name__}, kernel {conv.kernel_size}, stride {conv.stride}, "
                         f"padding {layer.time_causal_padding} then {conv.padding}) cannot take its rows from its "
                         "neighbours' bands exactly: splitting it into bands is not supported yet")


def _check_caller_padded(name: str, layer) -> None:
    conv = layer.conv
    if (conv.padding[-2] or conv.dilation[-2] != 1 or conv.padding_mode != "zeros"
            or not _banded_rows(conv.kernel_size[-2], conv.stride[-2], CALLER_PADDED_ROWS, CALLER_PADDED_ROWS)):
        raise ValueError(f"layer {name!r} ({type(layer).__name__}, kernel {conv.kernel_size}, stride {conv.stride}, "
                         f"padding {conv.padding} after its caller's {CALLER_PADDED_ROWS} row) cannot take its rows "
                         "from its neighbours' bands exactly: splitting it into bands is not supported yet")


def _pads_then_halves(conv) -> bool:
    """A 3x3 convolution of stride 2 without padding of its own: what a padded downsample runs after padding
    one zero row below (and one zero column right of) its input."""
    return (conv.kernel_size == (3, 3) and conv.stride == (2, 2) and tuple(conv.padding) == (0, 0)
            and conv.dilation == (1, 1) and conv.padding_mode == "zeros")


def _check_causal(name: str, conv) -> bool:
    """A video VAE's causal 3D convolution pads its frames itself and keeps the frames of the chunk before; its
    rows band as a plain convolution's. Whether it pads rows (then it is wrapped); ValueError if it cannot band."""
    explicit = isinstance(conv._padding, tuple)
    above, below = (conv._padding[2], conv._padding[3]) if explicit else (conv.padding[-2],) * 2
    if conv.stride[-2] != 1 or conv.dilation[-2] != 1 or above != below or conv.kernel_size[-2] != 2 * above + 1:
        raise ValueError(f"layer {name!r} ({type(conv).__name__}, kernel {conv.kernel_size}, stride {conv.stride}, "
                         f"padding {conv._padding}) does not keep its rows: splitting it into bands is not supported yet")
    return above > 0


def _check_conv(name: str, conv) -> None:
    if conv.dilation[-2] != 1:
        raise ValueError(f"layer {name!r} dilates its rows ({type(conv).__name__} dilation {conv.dilation}): "
                         "splitting it into bands is not supported yet")
    if not isinstance(conv.padding, str) and not _banded_rows(conv.kernel_size[-2], conv.stride[-2],
                                                              conv.padding[-2], conv.padding[-2]):
        raise ValueError(f"layer {name!r} changes the number of rows in a way bands cannot share (kernel "
                         f"{conv.kernel_size}, stride {conv.stride}, padding {conv.padding}): splitting it into bands "
                         "is not supported yet")
    if conv.padding_mode not in EDGE_MODES or isinstance(conv.padding, str):
        raise ValueError(f"layer {name!r} pads with {conv.padding_mode!r} (padding {conv.padding!r}): only numeric "
                         "zero, 'replicate' or 'reflect' padding splits into bands exactly")


def _wrap_zero_pad(pad: nn.ZeroPad2d, bands: _Bands) -> None:
    """A downsample's ZeroPad2d((0, 1, 0, 1)) on a band: a zero column on the right, and below the band the first
    row of the band below (a zero row at the image's bottom edge), so the halving convolution after it sees the
    whole image's rows."""
    original = pad.forward

    def forward(x):
        if bands.whole:
            return original(x)
        x = F.pad(x, (0, 1, 0, 0))
        _, below = bands.group.halo(x[..., :1, :], x[..., :0, :])  # nothing goes down: an empty message is skipped
        return torch.cat([x, x.new_zeros((*x.shape[:-2], 1, x.shape[-1])) if below is None else below], dim=-2)

    pad.forward = forward


def _wrap_halving_conv(conv, bands: _Bands) -> None:
    """A padded downsample's convolution on a band: the zero row its module padded below the band becomes the
    first row of the band below (it stays zero at the image's bottom edge). The band's rows must be even."""
    original = conv.forward

    def forward(x, *args, **kwargs):
        if bands.whole:
            return original(x, *args, **kwargs)
        if (x.shape[-2] - 1) % 2:
            raise ValueError(f"a band of {x.shape[-2] - 1} rows cannot be halved exactly: bands must start at "
                             "rows the encoder's downsampling divides")
        _, below = bands.group.halo(x[..., :1, :], x[..., :0, :])  # nothing goes down: an empty message is skipped
        if below is not None:
            x = torch.cat([x[..., :-1, :], below], dim=-2)
        return original(x, *args, **kwargs)

    conv.forward = forward


def _wrap_causal_conv(conv, bands: _Bands) -> None:
    """A causal 3D convolution (it prepends the frames of the chunk before, `cache_x`, or a list's entry, and pads
    its frames itself): the input and the cached frames each take their rows from the neighbours' bands. It runs
    on the band as written, then the rows at an inner edge are recomputed with no row padding (`_fix_edges`); on
    a band under twice its halo, on the band joined to its halos. Both forms are met: the row padding in an
    explicit `_padding` tuple (diffusers, ComfyUI v0.8) or in the convolution's `padding` (ComfyUI v0.24)."""
    original = conv.forward
    explicit = isinstance(conv._padding, tuple)
    rows = conv._padding[2] if explicit else conv.padding[-2]

    def unpadded(x, cache_x=None):
        saved = conv._padding, conv.padding
        if explicit:
            conv._padding = (*saved[0][:2], 0, 0, *saved[0][4:])
        else:
            conv.padding = (*saved[1][:-2], 0, saved[1][-1])
        try:
            return original(x, cache_x)
        finally:
            conv._padding, conv.padding = saved

    def forward(x, *args, **kwargs):
        if bands.whole:
            return original(x, *args, **kwargs)
        cache_x = args[0] if args else kwargs.get("cache_x")
        cache_list = args[1] if len(args) > 1 else kwargs.get("cache_list")
        if cache_list is not None:  # as the convolution itself takes it: the list's entry, then cleared
            index = args[2] if len(args) > 2 else kwargs.get("cache_idx")
            cache_x, cache_list[index] = cache_list[index], None
        inputs = (x,) if cache_x is None else (x, cache_x.to(x.device))
        halos = [_neighbours_rows(t, rows, rows, bands) for t in inputs]
        if x.shape[-2] >= 2 * rows:
            return _fix_edges(original(*inputs), inputs, *zip(*halos), rows, unpadded)
        return unpadded(*(_joined(t, upper, lower, rows) for t, (upper, lower) in zip(inputs, halos)))

    conv.forward = forward


def _neighbours_rows(x, above: int, below: int, bands: _Bands, stride: int = 1):
    """(the last `above` rows of the band above, the first `below` rows of the band below; None at the image's
    edge). A band with a band below must hold whole strides (bands start at multiples of the stride)."""
    if x.shape[-2] < max(above, below):
        raise ValueError(f"a band of {x.shape[-2]} rows cannot give its neighbours the {max(above, below)} rows a "
                         "convolution needs: use fewer devices for this image")
    if x.shape[-2] % stride and bands.group.index < bands.group.degree - 1:
        raise ValueError(f"a band of {x.shape[-2]} rows cannot be divided by a stride of {stride} exactly: bands "
                         "must start at rows the encoder's downsampling divides")
    # the band above takes this band's first rows (its rows below), the band below this band's last rows
    return bands.group.halo(x[..., :below, :], x[..., x.shape[-2] - above:, :])


def _joined(x, upper, lower, edge_rows: int):
    """`x` between its halos; `edge_rows` zero rows in place of a halo at the image's edge."""
    edge = x.new_zeros((*x.shape[:-2], edge_rows, x.shape[-1]))
    return torch.cat([edge if upper is None else upper, x, edge if lower is None else lower], dim=-2)


def _wrap_conv(conv, bands: _Bands) -> None:
    """The convolution pads only its columns (and frames); its rows come from the neighbours' bands, and it pads
    them (zeros, or its 'replicate' or 'reflect' `padding_mode`) only at the image's edge. Strided over rows, it
    takes the rows `_halo_rows` counts. Of stride 1 on a band of at least twice its halo, it runs on the band as
    written and then recomputes the rows at an inner edge from the halo and the band's first or last rows
    (`_fix_edges`): no copy of the band is made."""
    original, whole_padding = conv.forward, tuple(conv.padding)
    stride = conv.stride[-2]
    above, below = _halo_rows(conv.kernel_size[-2], stride, whole_padding[-2])
    unpadded = functools.partial(_without_row_padding, conv, original)

    def forward(x, *args, **kwargs):
        if bands.whole:
            return original(x, *args, **kwargs)
        upper, lower = _neighbours_rows(x, above, below, bands, stride)
        if stride == 1 and x.shape[-2] >= 2 * above:
            return _fix_edges(original(x, *args, **kwargs), (x,), (upper,), (lower,), above,
                              lambda t: unpadded(t, *args, **kwargs))
        if conv.padding_mode == "zeros":
            return unpadded(_joined(x, upper, lower, above), *args, **kwargs)
        return unpadded(torch.cat([t for t in (upper, x, lower) if t is not None], dim=-2), *args,
                        top=upper is None, bottom=lower is None, **kwargs)

    conv.forward = forward


def _without_row_padding(conv, original, x, *args, top: bool = False, bottom: bool = False, **kwargs):
    """`original` (conv's forward) on `x` with no row padding, but at the image's `top` or `bottom` edge where
    a padding mode other than zeros pads rows itself."""
    padding, modes = conv.padding, conv._reversed_padding_repeated_twice
    if conv.padding_mode == "zeros":
        conv.padding = (*padding[:-2], 0, padding[-1])
    else:  # (columns, columns, rows, rows, ...): what the padding mode pads
        conv._reversed_padding_repeated_twice = [*modes[:2], modes[2] if top else 0, modes[3] if bottom else 0,
                                                 *modes[4:]]
    try:
        return original(x, *args, **kwargs)
    finally:
        conv.padding, conv._reversed_padding_repeated_twice = padding, modes


def _fix_edges(out, inputs: tuple, uppers: tuple, lowers: tuple, rows: int, unpadded):
    """`out`, a stride-1 convolution's output on the band padded at its own edges, with its first and last `rows`
    rows recomputed where a neighbour's band lies beyond them: `unpadded(*slabs)` on each input's halo joined to
    its first (last) 2 x `rows` rows gives those rows exactly. inputs, uppers, lowers: the convolution's inputs
    (a causal one's: the chunk and its cached frames) and their halos (None at the image's edge)."""
    if uppers[0] is not None:
        out[..., :rows, :] = unpadded(*(torch.cat([u, t[..., :2 * rows, :]], dim=-2) for u, t in zip(uppers, inputs)))
    if lowers[0] is not None:
        out[..., -rows:, :] = unpadded(*(torch.cat([t[..., -2 * rows:, :], d], dim=-2) for d, t in zip(lowers, inputs)))
    return out


def _wrap_self_padding(layer, bands: _Bands) -> None:
    """A convolution that pads its input itself (in its `pad_mode`: HunyuanVideo's replicates) and then runs
    unpadded: its rows come from the neighbours' bands, and it pads rows only at the image's edge (columns and
    frames as written). Padding is per dimension, so joining the rows first gives the whole's padded values."""
    conv, padding = layer.conv, tuple(layer.time_causal_padding)
    stride = conv.stride[-2]
    above, below = _halo_rows(conv.kernel_size[-2], stride, padding[2])
    original = layer.forward

    def forward(x):
        if bands.whole:
            return original(x)
        upper, lower = _neighbours_rows(x, above, below, bands, stride)
        x = torch.cat([t for t in (upper, x, lower) if t is not None], dim=-2)
        pad = (*padding[:2], 0 if upper is not None else padding[2], 0 if lower is not None else padding[3],
               *padding[4:])
        return conv(F.pad(x, pad, mode=layer.pad_mode))

    layer.forward = forward


def _wrap_caller_padded(layer, bands: _Bands) -> None:
    """A convolution whose caller padded the band (CarriedConv3d): the padded row above (below) the band becomes
    the last (first) row of the band above (below), padded as that band's caller padded it, which is what the
    whole image's padding holds there (replicate padding is per dimension: its frames and columns match). The
    padded input is the caller's own tensor (a new one at every call), so its rows are replaced in place."""
    rows, stride = CALLER_PADDED_ROWS, layer.conv.stride[-2]
    above, below = _halo_rows(layer.conv.kernel_size[-2], stride, rows)
    original = layer.forward

    def forward(x):
        if bands.whole:
            return original(x)
        if not (torch.equal(x[..., :rows, :], x[..., rows:2 * rows, :])
                and torch.equal(x[..., -rows:, :], x[..., -2 * rows:-rows, :])):
            raise RuntimeError(f"a {type(layer).__name__}'s input is not padded by {rows} replicated row above and "
                               "below, as ComfyUI's conv_carry_causal_3d pads it: this VAE cannot be split into bands")
        upper, lower = _neighbours_rows(x[..., rows:x.shape[-2] - rows, :], above, below, bands, stride)
        if upper is not None:
            x[..., :rows, :] = upper
        if lower is not None and below:  # a strided one never reads the padded row below
            x[..., x.shape[-2] - rows:, :] = lower
        return original(x)

    layer.forward = forward


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
    """The block runs on the whole image (its input's bands gathered), and hands on this band's rows."""
    original = block.forward

    def forward(x, *args, **kwargs):
        if bands.whole:
            return original(x, *args, **kwargs)
        whole, first = bands.group.gather_rows(x)
        bands.whole += 1
        try:
            out = original(whole, *args, **kwargs)
        finally:
            bands.whole -= 1
        return out[..., first:first + x.shape[-2], :]

    block.forward = forward


class PeerBands:
    """Bands over torch.distributed: the ranks `peers` (global ranks; this one is peers[index]) in image order,
    each exchanging halos with the bands above and below it. Messages pair in issue order (NCCL): every rank
    posts the same exchanges in the same order, as the network's layers run."""

    def __init__(self, peers: tuple[int, ...], index: int, device):
        self.peers, self.index, self.degree, self.device = tuple(peers), index, len(peers), torch.device(device)
        self.bytes = 0

    def halo(self, top: torch.Tensor, bottom: torch.Tensor):
        up = self.peers[self.index - 1] if self.index > 0 else None
        down = self.peers[self.index + 1] if self.index < self.degree - 1 else None
        sends = [(peer, t) for peer, t in ((up, top), (down, bottom)) if peer is not None]
        # the band above sends down its bottom rows (shaped as this band's bottom), the band below its top rows
        receives = [(peer, tuple(t.shape), t.dtype) for peer, t in ((up, bottom), (down, top)) if peer is not None]
        buffers, handles = primitives.exchange(sends, receives, self.device)
        primitives.wait_all(handles)
        self.bytes += sum(t.numel() * t.element_size() for _, t in sends)
        received = iter(buffers)
        return (next(received) if up is not None else None), (next(received) if down is not None else None)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        every = self._all_gather(tensor.contiguous().reshape(-1))
        out = every[0]
        for part in every[1:]:  # in rank order: the same bits on every rank
            out = out + part
        return out.reshape(tensor.shape)

    def gather_rows(self, band: torch.Tensor) -> tuple[torch.Tensor, int]:
        heights = self._all_gather(torch.tensor([band.shape[-2]], dtype=torch.int64, device=self.device))
        heights = [int(h) for h in heights]
        width = max(heights)
        padded = band if band.shape[-2] == width else F.pad(band, (0, 0, 0, width - band.shape[-2]))
        pieces = self._all_gather(padded.contiguous().reshape(-1))
        rows = [piece.reshape(padded.shape)[..., :h, :] for piece, h in zip(pieces, heights)]
        return torch.cat(rows, dim=-2), sum(heights[:self.index])

    def _all_gather(self, flat: torch.Tensor) -> list[torch.Tensor]:
        whole = primitives.finish_all_gather(primitives.start_all_gather(flat, list(self.peers), self.index,
                                                                         self.device))
        self.bytes += flat.numel() * flat.element_size() * (self.degree - 1)
        return list(whole.reshape(self.degree, -1))
