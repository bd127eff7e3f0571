"""`patch` (DistriFusion) for SD1.x / SDXL UNets: each rank of a patch group runs the whole UNet on its band of
the latent's rows, and what a band needs of the others comes from the previous call (issue 30).

Bands start at multiples of the UNet's total downsampling (8 rows for SD1.x and SDXL: every band keeps whole
rows down to the deepest level). The layers that see beyond a band:
- convolutions that pad their rows take the neighbours' edge rows (`vae_bands.band_in_place` wraps them, with
  this module's group as its `group`); GroupNorm takes the whole image's statistics (the group's `sum`);
- self-attention (models/unet_patch_attention.py): this band's queries attend to every band's keys and values.
How fresh the others' part is depends on the call:
- synchronous (`context.synchronous`, the warm-up, or the first call of a job or of a new shape): every exchange
  is waited for at once, so the output equals the whole UNet's (to float rounding);
- stale: each exchange is posted as soon as its tensors are known and finished at the same layer of the next call;
  the layer uses what the previous call posted (DistriFusion's displaced halos, keys and values), own band fresh.
  GroupNorm's sums: the others' from the previous call, this band's fresh (whole = stale whole - stale own + fresh
  own), unless `norms` is "synchronous" (then they are waited for at every call).
Measured (tests/test_unet_patch.py and tests/comfy/test_comfy_unet_patch.py: 2 bands of a 32 x 16 latent, 10 DDIM
steps, 2 synchronous, narrow random-weight UNets), PSNR of the final latents against the whole UNet's, stale /
synchronous GroupNorm statistics: diffusers SD1.5 54.0 / 60.4 dB, SDXL 53.2 / 61.4 dB; ComfyUI SD1.x 48.3 /
54.3 dB, SDXL 47.9 / 54.6 dB. Stale statistics cost about 6-8 dB and stay far above the 30 dB floor, while
synchronous ones put three blocking exchanges in every GroupNorm of every step; the default is "stale".

A ControlNet's residuals (ComfyUI's `control`, computed whole by the host) are cut to the band's rows. `stale`
holds this runner's state under "unet_patch" and must be one per stream (cond and uncond apart); a call whose
shapes differ from the previous one's runs synchronous.

Every rank posts the same exchanges in the same order (the layers run in the same order on every band), each an
NCCL group of its sends and receives (runtime/primitives.py `exchange`), so messages pair in issue order. The
exchanges posted at the last call of a job stay in flight until `finish_pending(stale)`.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref

import torch

from ..runtime import primitives
from ..strategies.sequence.traffic import timed_wait
from . import unet_patch_attention, vae_bands

STATE = "unet_patch"  # the key of this runner's state in `context.stale`
NORMS = ("stale", "synchronous")


def run_unet_patch(module, call, context) -> torch.Tensor:
    """The output (B, C, H, W) of `module` (a diffusers UNet2DConditionModel or ComfyUI's UNetModel) on `call`
    (x: (B, C, H, W), the whole rows of this patch group), computed in bands over `context.peers`; every rank
    returns the whole. `context`: peers, index, degree, device, step, synchronous, stale (a dict kept across the
    calls of a job), traffic, and optionally norms ("stale" or "synchronous", see the module doc)."""
    norms = getattr(context, "norms", "stale")
    if norms not in NORMS:
        raise ValueError(f"norms must be one of {', '.join(NORMS)}, not {norms!r}")
    forward = _check_call(module, call)
    state = context.stale.setdefault(STATE, {"exchanges": []})
    layers, attentions = _layers(module, state)
    bands = band_heights(call.x.shape[-2], vae_bands.convs_row_scale(layers[0]), context.degree)
    signature = (tuple(call.x.shape), call.x.dtype, None if call.context is None else tuple(call.context.shape),
                 tuple(bands))
    previous = state.pop("signature", None)  # absent until this call completes
    synchronous = bool(context.synchronous) or previous != signature
    if not synchronous and hasattr(context, "stale_reads"):
        context.stale_reads += 1  # the strategy counts the calls that used stale values (the bench's line)
    if previous is None:
        state["exchanges"] = []  # nothing, or what a failed call left: never used
    elif synchronous:
        finish_pending(context.stale)
    link = PeerLink(context.peers, context.index, context.device, getattr(context, "traffic", None))
    group = PatchBands(link, bands, state["exchanges"], synchronous, norms == "synchronous")
    band_call = _band_call(call, sum(bands[:context.index]), bands[context.index])
    own_forwards = [attn.__dict__.get("forward") for _, attn in attentions]
    vae_bands.band_in_place(module, group, whole=(), layers=layers)
    try:
        for _, attn in attentions:
            unet_patch_attention.wrap(attn, group)
        out = forward(module, band_call)
    finally:
        for (_, attn), own in zip(attentions, own_forwards):
            attn.__dict__.pop("forward", None)
            if own is not None:
                attn.forward = own
        vae_bands.unband(module)
    whole, _ = group.gather_rows(out)
    state["signature"] = signature
    return whole


def _layers(module, state: dict):
    """(vae_bands.band_layers, self-attentions) of `module`, scanned at its first call of the job: the scans walk
    every module of the UNet, which costs more than a GPU's step of a small UNet."""
    cached = state.get("layers")
    if cached is None or cached[0] is not module:
        cached = state["layers"] = (module, vae_bands.band_layers(module, whole=()),
                                    unet_patch_attention.self_attentions(module))
    return cached[1:]


def check_call(module, call, degree: int) -> None:
    """ValueError in one sentence, on the host before any work, for a call `degree` bands cannot take (what
    `run_unet_patch` would refuse on the workers)."""
    _check_call(module, call)
    scale = _SCALES.get(module)
    if scale is None:
        scale = _SCALES[module] = vae_bands.convs_row_scale(vae_bands.band_layers(module, whole=())[0])
    band_heights(call.x.shape[-2], scale, degree)


_SCALES = weakref.WeakKeyDictionary()  # a UNet -> its downsampling (the scan walks every module: once per UNet)


def _check_call(module, call):
    """The family's forward for `module`; ValueError in one sentence for a call whose inputs a band cannot take."""
    from . import comfy_unet, diffusers_unet

    adapter = comfy_unet if hasattr(module, "input_blocks") else diffusers_unet
    extras = {name for name, value in call.extras.items() if value is not None}
    unsupported = extras - adapter.SUPPORTED_EXTRAS
    if unsupported:
        raise ValueError(f"patch cannot split a UNet call with {', '.join(sorted(unsupported))}: use cfg or batch "
                         "for it")
    if call.x.dim() != 4:
        raise ValueError(f"patch splits a UNet's latent (B, C, H, W) into bands of rows, not one of shape "
                         f"{tuple(call.x.shape)}")
    return adapter.forward


def _band_call(call, start: int, rows: int):
    """`call` on the latent's rows start .. start + rows, with a ControlNet's residuals (ComfyUI's `control`: lists
    of (B, C, h, w) per block, the whole image at each block's resolution) cut to the same rows."""
    total = call.x.shape[-2]

    def rows_of(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t[..., start * t.shape[-2] // total:(start + rows) * t.shape[-2] // total, :]

    extras = dict(call.extras)
    if extras.get("control"):
        extras["control"] = {kind: [rows_of(t) for t in residuals] if isinstance(residuals, (list, tuple))
                             else residuals for kind, residuals in extras["control"].items()}
    return dataclasses.replace(call, x=call.x[..., start:start + rows, :], extras=extras)


def band_heights(rows: int, scale: int, degree: int) -> list[int]:
    """The latent rows of each of `degree` bands, each a multiple of `scale` (the UNet's downsampling). Raises
    ValueError in one sentence where `rows` does not allow it."""
    if rows % scale:
        raise ValueError(f"patch cuts the latent into bands of whole multiples of {scale} rows (the UNet's "
                         f"downsampling), and this latent has {rows} rows: use a latent height {scale} divides")
    if rows // scale < degree:
        raise ValueError(f"a latent of {rows} rows gives at most {rows // scale} bands of {scale} rows, fewer than "
                         f"the {degree} devices of this patch group: use at most {rows // scale} devices for it")
    return [units * scale for units in primitives.chunk_sizes(rows // scale, degree)]


def finish_pending(stale: dict) -> None:
    """Waits for the exchanges the last call left in flight: call it at a job's end, before `stale` is dropped, so
    nothing is left posted (their buffers stay in `stale` for a next stale call)."""
    state = stale.get(STATE)
    for posted in state["exchanges"] if state else []:
        posted.finish()


@dataclasses.dataclass
class Posted:
    """One exchange in flight: the buffers its receives fill, their handles, the sent tensors (alive until
    finished), and the link that posted it."""

    buffers: list
    handles: list
    sent: list
    link: "PeerLink"

    def finish(self) -> list[torch.Tensor]:
        return self.link.finish(self)


class PeerLink:
    """Exchanges with the band's peers (global ranks `peers`, this rank `peers[index]`) through runtime/primitives,
    what is sent counted and what is waited timed in `traffic` (strategies/sequence/traffic.py; None: not counted)."""

    def __init__(self, peers, index: int, device, traffic=None):
        self.peers, self.index, self.device, self.traffic = tuple(peers), index, torch.device(device), traffic

    def post(self, sends: list[tuple[int, torch.Tensor]], receives: list[tuple[int, tuple, torch.dtype]]) -> Posted:
        """Starts every send (band index, tensor) and receive (band index, shape, dtype) as one batch."""
        buffers, handles = primitives.exchange([(self.peers[i], t) for i, t in sends],
                                               [(self.peers[i], shape, dtype) for i, shape, dtype in receives],
                                               self.device)
        if self.traffic is not None:
            self.traffic.record([t for _, t in sends])
        return Posted(buffers, handles, [t for _, t in sends], self)

    def finish(self, posted: Posted) -> list[torch.Tensor]:
        """The received buffers, once every handle of `posted` is done."""
        if posted.handles:
            timed_wait(self.traffic, primitives.wait_all, posted.handles)
            posted.handles, posted.sent = [], []
        return posted.buffers


class PatchBands:
    """vae_bands' group interface (degree, index, halo, sum, gather_rows) and `keys_values` for one call of one
    band: `bands` the latent rows of every band, `exchanges` what the previous call posted, in the order posted
    (replaced by this call's), `synchronous` whether this call waits for its own exchanges (else it uses the
    previous call's), `synchronous_norms` whether the GroupNorms' sums do anyway."""

    def __init__(self, link: PeerLink, bands: list[int], exchanges: list, synchronous: bool,
                 synchronous_norms: bool = False):
        self.link, self.bands, self.exchanges = link, bands, exchanges
        self.degree, self.index = len(bands), link.index
        self.synchronous, self.synchronous_norms = synchronous, synchronous_norms
        self.order = itertools.count()
        self.others = [i for i in range(self.degree) if i != self.index]

    def _swap(self, sends, receives, synchronous: bool) -> list[torch.Tensor]:
        """Posts this call's exchange and returns the buffers to use: this call's (synchronous: waited for now) or
        the previous call's at the same place. Either way this call's is kept for the next call."""
        position = next(self.order)
        posted = self.link.post(sends, receives)
        if position == len(self.exchanges):
            self.exchanges.append(posted)
            previous = None
        else:
            previous, self.exchanges[position] = self.exchanges[position], posted
        if synchronous or previous is None:
            return self.link.finish(posted)
        return self.link.finish(previous)

    def _rows(self, tensor: torch.Tensor, band: int) -> int:
        """Rows (or tokens) of band `band` at the resolution where this band's `tensor` has its own."""
        return tensor.shape[-2] * self.bands[band] // self.bands[self.index]

    def halo(self, top: torch.Tensor, bottom: torch.Tensor):
        up = self.index - 1 if self.index > 0 else None
        down = self.index + 1 if self.index < self.degree - 1 else None
        sends = [(peer, t) for peer, t in ((up, top), (down, bottom)) if peer is not None]
        # the band above sends down its bottom rows (shaped as this band's bottom), the band below its top rows
        receives = [(peer, tuple(t.shape), t.dtype) for peer, t in ((up, bottom), (down, top)) if peer is not None]
        received = iter(self._swap(sends, receives, self.synchronous))
        return (next(received) if up is not None else None), (next(received) if down is not None else None)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every band's part added in band order: the same bits on every rank when synchronous; else the others'
        parts from the previous call and this band's fresh."""
        received = iter(self._swap([(i, tensor) for i in self.others],
                                   [(i, tuple(tensor.shape), tensor.dtype) for i in self.others],
                                   self.synchronous or self.synchronous_norms))
        out = None
        for band in range(self.degree):
            part = tensor if band == self.index else next(received)
            out = part if out is None else out + part
        return out

    def keys_values(self, keys: torch.Tensor, values: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) (B, H, L, D) of every band in band order: this band's `keys` and `values`, the others'
        of this call (synchronous) or of the previous one."""
        receives = [(i, (*t.shape[:-2], self._rows(t, i), t.shape[-1]), t.dtype)
                    for i in self.others for t in (keys, values)]
        received = iter(self._swap([(i, t) for i in self.others for t in (keys, values)], receives,
                                   self.synchronous))
        return [(keys, values) if band == self.index else (next(received), next(received))
                for band in range(self.degree)]

    def gather_rows(self, band: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The whole along dim -2 and this band's first row in it, waited for now (not kept for the next call)."""
        receives = [(i, (*band.shape[:-2], self._rows(band, i), band.shape[-1]), band.dtype) for i in self.others]
        received = iter(self.link.finish(self.link.post([(i, band) for i in self.others], receives)))
        rows = [band if i == self.index else next(received) for i in range(self.degree)]
        return torch.cat(rows, dim=-2), sum(r.shape[-2] for r in rows[:self.index])
