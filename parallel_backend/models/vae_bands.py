"""A VAE's convolutional network split into bands of rows over a group of devices, equal to one device (issue 29).

Each rank runs the whole network on its own band of the image's rows. Three kinds of layer see beyond a band,
and each is made exact (`band_in_place` wraps the module's own layers; the rest of the network is untouched):
- a convolution that pads its rows (3x3: one row above and below) first takes those rows from its neighbours'
  bands (`halo`), and pads its own rows only where the band meets the image's edge (zeros, as the whole does);
- a GroupNorm takes its statistics over the whole image: each rank's sums per group are added over the group
  (`sum`: every rank's partial, added in rank order, so every rank gets the same bits), mean first, then the
  squared deviations from it (two passes, as numerically sound as the whole's);
- an attention block (the mid block's: every position attends to every other) runs on the whole image: its
  input's bands are gathered (`gather_rows`), the block runs whole on every rank, each keeps its own rows.
  It runs at the network's smallest resolution, where a whole image is cheap.
- an encoder's padded downsample (a zero row below, then a 3x3 convolution of stride 2) takes, in place of that
  zero row, the first row of the band below, whether the module pads in its forward (SD's) or through a
  ZeroPad2d before the convolution (Wan's): bands start at rows the downsampling divides.
Everything else (1x1 convolutions, nearest upsampling, activations, residual additions) works row by row, so a
band computes exactly its rows. Rows are the second-to-last dimension: a video VAE's (batch, channels, frames,
rows, columns) bands the same way; its causal 3D convolutions (which pad their frames themselves and prepend
the chunk before, cache_x) take halos for the input and for the cached frames, so each band keeps its own cache
of its own rows.

A `group` is what the bands exchange through: `PeerBands` (torch.distributed, one rank per device), or the
tests' threads (tests/tensor_threads.py). Its interface: `degree`, `index`, `halo(top, bottom)` -> (the rows
of the band above, of the band below; None at the image's edge), `sum(tensor)`, `gather_rows(tensor)` -> (the
whole along dim -2, this band's first row in it).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..runtime import primitives

# Blocks whose every output position reads every input position: run whole on gathered rows. diffusers' VAEs
# use Attention (attention_processor), WanAttentionBlock and QwenImageAttentionBlock (per frame); ComfyUI's
# AttnBlock (ldm/modules/diffusionmodules/model.py) and AttentionBlock (ldm/wan/vae.py).
WHOLE_BLOCKS = ("Attention", "AttnBlock", "AttentionBlock")  # class names ending so (a family's prefix before)
# Encoders' downsamples that pad their input with one zero row below and one zero column on the right, then run
# a 3x3 convolution of stride 2 without padding (diffusers' Downsample2D, ComfyUI's Downsample): on a band of an
# even number of rows, the row below is the next band's first row, not a zero (`_wrap_halving_conv`).
PADDED_DOWNSAMPLES = ("Downsample2D", "Downsample")


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


def band_in_place(module: nn.Module, group) -> nn.Module:
    """Wraps `module`'s row-mixing layers (see the module doc) to run on this rank's band with `group`. Raises
    ValueError in one sentence, before any work, for a layer it cannot band exactly (a strided convolution, or
    padding other than zeros)."""
    if getattr(module, "_tandem_bands", None) is not None:
        raise ValueError("this module is already split into bands")
    bands = _Bands(group)
    convs, norms, whole_blocks = check_layers(module)
    for conv in convs:
        if isinstance(conv, nn.ZeroPad2d):
            _wrap_zero_pad(conv, bands)
        elif hasattr(conv, "_padding"):
            _wrap_causal_conv(conv, bands)
        else:
            (_wrap_halving_conv if conv.stride[-2] == 2 else _wrap_conv)(conv, bands)
    for norm in norms:
        _wrap_group_norm(norm, bands)
    for block in whole_blocks:
        _wrap_whole(block, bands)
    module.__dict__["_tandem_bands"] = bands
    return module


def check_layers(module: nn.Module) -> tuple[list, list, list]:
    """The layers a band split wraps: (convolutions that pad their rows, GroupNorms, blocks that run whole),
    outside the whole blocks. Raises ValueError in one sentence for a layer it cannot band exactly."""
    whole_blocks = [m for m in module.modules() if type(m).__name__.endswith(WHOLE_BLOCKS)]
    inside = {id(sub) for block in whole_blocks for sub in block.modules()}
    halved = {id(m.conv) for m in module.modules() if type(m).__name__ in PADDED_DOWNSAMPLES
              and isinstance(getattr(m, "conv", None), nn.Conv2d) and _pads_then_halves(m.conv)}
    # a ZeroPad2d((0, 1, 0, 1)) right before such a convolution (Wan's downsamples): the pad takes the halo
    pads = {id(pad): conv for m in module.modules() if isinstance(m, nn.Sequential)
            for pad, conv in zip(m, list(m)[1:]) if isinstance(pad, nn.ZeroPad2d)
            and tuple(pad.padding) == (0, 1, 0, 1) and isinstance(conv, nn.Conv2d) and _pads_then_halves(conv)}
    after_pads = {id(conv) for conv in pads.values()}
    convs, norms = [], []
    for name, layer in module.named_modules():
        if id(layer) in inside or id(layer) in after_pads:
            continue
        if id(layer) in halved or id(layer) in pads:
            convs.append(layer)
        elif isinstance(layer, nn.Conv3d) and hasattr(layer, "_padding"):
            if _check_causal(name, layer):
                convs.append(layer)
        elif isinstance(layer, (nn.Conv2d, nn.Conv3d)):
            _check_conv(name, layer)
            if layer.padding[-2]:
                convs.append(layer)
        elif isinstance(layer, nn.GroupNorm):
            norms.append(layer)
    return convs, norms, whole_blocks


def row_scale(module: nn.Module) -> int:
    """Image rows per latent row: 2 to the number of the encoder's row-halving downsamples (what an encoder's bands
    must start at multiples of)."""
    convs, _, _ = check_layers(module)
    return 2 ** sum(1 for layer in convs if isinstance(layer, nn.ZeroPad2d) or layer.stride[-2] == 2)


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
    if conv.stride[-2] != 1 or conv.dilation[-2] != 1:
        raise ValueError(f"layer {name!r} strides or dilates its rows ({type(conv).__name__} stride {conv.stride}, "
                         f"dilation {conv.dilation}): splitting it into bands is not supported yet")
    if not isinstance(conv.padding, str) and conv.kernel_size[-2] != 2 * conv.padding[-2] + 1:
        raise ValueError(f"layer {name!r} changes the number of rows (kernel {conv.kernel_size}, padding "
                         f"{conv.padding}): splitting it into bands is not supported yet")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"layer {name!r} pads with {conv.padding_mode!r} ({conv.padding!r}): only numeric zero "
                         "padding splits into bands exactly")


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
    its frames itself): the input and the cached frames each take their rows from the neighbours' bands, then the
    convolution runs as written with no row padding of its own. Both forms are met: the row padding in an
    explicit `_padding` tuple (diffusers, ComfyUI v0.8) or in the convolution's `padding` (ComfyUI v0.24)."""
    original = conv.forward
    explicit = isinstance(conv._padding, tuple)
    rows = conv._padding[2] if explicit else conv.padding[-2]

    def forward(x, *args, **kwargs):
        if bands.whole:
            return original(x, *args, **kwargs)
        cache_x = args[0] if args else kwargs.get("cache_x")
        cache_list = args[1] if len(args) > 1 else kwargs.get("cache_list")
        if cache_list is not None:  # as the convolution itself takes it: the list's entry, then cleared
            index = args[2] if len(args) > 2 else kwargs.get("cache_idx")
            cache_x, cache_list[index] = cache_list[index], None
        x = _with_halo(x, rows, bands)
        if cache_x is not None:
            cache_x = _with_halo(cache_x.to(x.device), rows, bands)
        saved = conv._padding, conv.padding
        if explicit:
            conv._padding = (*saved[0][:2], 0, 0, *saved[0][4:])
        else:
            conv.padding = (*saved[1][:-2], 0, saved[1][-1])
        try:
            return original(x, cache_x)
        finally:
            conv._padding, conv.padding = saved

    conv.forward = forward


def _with_halo(x, rows: int, bands: _Bands):
    """`x` with `rows` rows of the band above and below it (zeros at the image's edge)."""
    if x.shape[-2] < rows:
        raise ValueError(f"a band of {x.shape[-2]} rows cannot give its neighbours the {rows} rows a "
                         "convolution needs: use fewer devices for this image")
    above, below = bands.group.halo(x[..., :rows, :], x[..., -rows:, :])
    edge = x.new_zeros((*x.shape[:-2], rows, x.shape[-1]))
    return torch.cat([edge if above is None else above, x, edge if below is None else below], dim=-2)


def _wrap_conv(conv, bands: _Bands) -> None:
    """The convolution pads only its columns (and frames); its rows come from the neighbours' bands, or zeros at
    the image's edge."""
    original, whole_padding = conv.forward, tuple(conv.padding)
    band_padding = (*whole_padding[:-2], 0, whole_padding[-1])
    rows = whole_padding[-2]

    def forward(x, *args, **kwargs):
        if bands.whole:
            return original(x, *args, **kwargs)
        x = _with_halo(x, rows, bands)
        conv.padding = band_padding
        try:
            return original(x, *args, **kwargs)
        finally:
            conv.padding = whole_padding

    conv.forward = forward


def _wrap_group_norm(norm: nn.GroupNorm, bands: _Bands) -> None:
    """GroupNorm over the whole image: the per-group mean, then the variance about it, summed over the bands."""
    original = norm.forward

    def forward(x):
        if bands.whole:
            return original(x)
        groups = norm.num_groups
        flat = x.reshape(x.shape[0], groups, -1).float()
        count = bands.group.sum(torch.tensor([float(flat.shape[-1])], dtype=torch.float64, device=x.device))
        mean = (bands.group.sum(flat.sum(-1, dtype=torch.float64)) / count).to(flat.dtype)
        centred = flat - mean[..., None]
        var = (bands.group.sum((centred * centred).sum(-1, dtype=torch.float64)) / count).to(flat.dtype)
        out = (centred * torch.rsqrt(var + norm.eps)[..., None]).reshape(x.shape).to(x.dtype)
        if norm.affine:
            shape = (1, -1, *([1] * (x.dim() - 2)))
            out = out * norm.weight.reshape(shape).to(out.dtype) + norm.bias.reshape(shape).to(out.dtype)
        return out

    norm.forward = forward


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
