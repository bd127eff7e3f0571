"""A VAE decode's figures for the banded cost (plan/vae_costs.py), counted by running the decode once on the
`meta` device (shapes only: no memory, no values) with hooks on the layers models/vae_bands.py wraps: FLOPs by
torch's FlopCounterMode, those of the blocks that run whole apart (a snapshot of the count at each one's entry
and exit); each padded convolution's halo from its input's shape (its padding rows x the input's other
dimensions, with the cached frames a causal 3D convolution joins first); each GroupNorm call's per-group sums;
each whole block's input; and the bytes held (`LiveBytes`: every tensor the decode makes, counted from its
making until its last reference goes, views with their storage; the weights and the latent not counted).

Also `tandem plan --vae`'s line: the bench model's VAE decode timed once on one device here, then counted on
meta and predicted in bands on the plan's devices.
"""

from __future__ import annotations

import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

from ..models import vae_bands, vae_families, vae_grid
from .links import Link
from .vae_costs import F64, VaeDecode, predict_decode


class _Held:
    """One storage's share of the live bytes: freed when the last tensor on it goes."""

    __slots__ = ("__weakref__",)


class LiveBytes(TorchDispatchMode):
    """The bytes of the tensors made while this mode is on and still referenced: `live` now, `peak` the most
    outside the blocks marked whole (`enter`, `leave`), `block_entry` the most held at a whole block's entry and
    `block_peak` the most a whole block added over its entry. Storages of `keep` (weights, inputs) are not
    counted; a view counts with its storage, once."""

    def __init__(self, keep=()):
        super().__init__()
        self.live = self.peak = self.block_entry = self.block_peak = 0
        self._entry, self._whole = 0, 0
        self._owner = WeakIdKeyDictionary()
        self._storages: dict[int, weakref.ref] = {}
        self._kept = {t.untyped_storage()._cdata for t in keep}

    def enter(self) -> None:
        self._whole += 1
        if self._whole == 1:
            self._entry = self.live
            self.block_entry = max(self.block_entry, self.live)

    def leave(self) -> None:
        self._whole -= 1

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t not in self._owner:
                self._own(t)
        return out

    def _own(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._kept:
            return
        ref = self._storages.get(key)
        held = ref() if ref is not None else None
        if held is None:  # a new storage (or an address reused after the last one's end)
            held, nbytes = _Held(), storage.nbytes()
            self._storages[key] = weakref.ref(held)
            weakref.finalize(held, self._free, nbytes)
            self.live += nbytes
            if self._whole:
                self.block_peak = max(self.block_peak, self.live - self._entry)
            else:
                self.peak = max(self.peak, self.live)
        self._owner[t] = held


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tile(conv, args, kwargs) -> tuple:
    """One call of a convolution vae_bands wraps, as VaeDecode.tiles counts it: (bytes of its input, and of the
    cached frames a causal 3D convolution joins first, per row and column position; rows; columns; (rows from
    above, from below); (columns from the left, from the right))."""
    x = args[0]
    pads = getattr(conv, "_padding", None)
    joined = [x]
    if isinstance(pads, tuple):  # a causal 3D convolution: the cached frames join its input first
        cache = args[1] if len(args) > 1 else kwargs.get("cache_x")
        joined = [x, cache] if isinstance(cache, torch.Tensor) and pads[4] > 0 else [x]
    rows, columns = x.shape[-2], x.shape[-1]
    return (sum(_nbytes(t) for t in joined) // (rows * columns), rows, columns, *vae_bands.halos(conv))


def count_decode(vae, latent: torch.Tensor) -> VaeDecode:
    """The figures of `vae` decoding `latent` on one device, both on the meta device (ValueError, one sentence,
    for a VAE Tandem cannot split into bands)."""
    family = vae_families.family_of(vae)
    if family is None:
        raise ValueError(f"Tandem has no band split for a {type(vae).__name__} VAE")
    convs, norms, whole = vae_bands.check_layers(vae)
    halos, norm_bytes, inputs, whole_flops = [], [], [], [0]
    counter = FlopCounterMode(display=False)
    live = LiveBytes([*vae.parameters(), *vae.buffers(), latent])
    started = []

    def on_conv(conv, args, kwargs):
        halos.append(_tile(conv, args, kwargs))

    def on_norm(norm, args):
        norm_bytes.append(args[0].shape[0] * norm.num_groups * F64)

    def on_whole(block, args):
        inputs.append(_nbytes(args[0]))
        started.append(counter.get_total_flops())
        live.enter()

    def after_whole(block, args, out):
        live.leave()
        whole_flops[0] += counter.get_total_flops() - started.pop()

    handles = [c.register_forward_pre_hook(on_conv, with_kwargs=True) for c in convs]
    handles += [n.register_forward_pre_hook(on_norm) for n in norms]
    handles += [b.register_forward_pre_hook(on_whole) for b in whole]
    handles += [b.register_forward_hook(after_whole) for b in whole]
    try:
        with torch.inference_mode(), counter, live:
            image = family.decode(vae, latent)
    finally:
        for handle in handles:
            handle.remove()
    weights = sum(_nbytes(t) for t in (*vae.parameters(), *vae.buffers()))
    edges = tuple((max(above) * position * columns, sum(n > 0 for n in above))
                  for position, _, columns, above, _ in halos)  # one band edge's bytes, to how many neighbours
    return VaeDecode(counter.get_total_flops(), whole_flops[0], latent.shape[-2], edges, tuple(norm_bytes),
                     tuple(inputs), weights, live.peak, live.block_entry,
                     live.block_peak, _nbytes(latent), _nbytes(image), latent.shape[-1], tuple(halos))


def measure_bench_vae(name: str, resolution: tuple[int, int], device, frames: int | None = None,
                      threads: int | None = None, corner: bool = False) -> tuple[float, VaeDecode]:
    """(seconds of one decode, its counted figures) of bench model `name`'s VAE (models/benchmodels_vae.py) at
    `resolution` on `device`: fp32 on a CPU (with `threads` threads), fp16 on CUDA; after one untimed decode
    (the first call pays one-time costs: CUDA's lazy start and cuDNN's algorithm search at the same size; on a
    CPU, where a second decode of a large VAE costs minutes, a decode of the latent's first 8 x 8 rows and
    columns, and 2 frames of a clip). Then the same VAE, moved to meta, is counted. With `corner`, the timed decode
    is that corner's again, scaled to the whole by the counted FLOPs (seconds, not minutes, on a CPU: the plan's
    end to end). ValueError, one sentence, for a bench model without a VAE."""
    from ..models.benchmodels_vae import bench_latent, build_bench_vae
    from ..models.stages import synchronize

    device = torch.device(device)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    vae = build_bench_vae(name, dtype).to(device)
    latent = bench_latent(name, resolution, dtype, frames).to(device)
    family = vae_families.family_of(vae)
    cores = torch.get_num_threads()
    try:
        if device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            family.decode(vae, latent if device.type == "cuda" else _corner(latent))
            synchronize(device)
            timed = _corner(latent) if corner else latent
            begun = time.perf_counter()
            family.decode(vae, timed)
            synchronize(device)
            seconds = time.perf_counter() - begun
    finally:
        torch.set_num_threads(cores)
    decode = count_decode(vae.to("meta"), latent.to("meta"))
    if corner:
        seconds *= decode.flops / count_decode(vae, timed.to("meta")).flops
    return seconds, decode


def decode_end_to_end(name: str, resolution: tuple[int, int], frames: int | None, devices: list, link: Link,
                      overhead_s: float, contention: float = 1.0) -> tuple[float, float] | None:
    """(one device's seconds, the pool's in bands) of bench model `name`'s VAE decode, for the plan's end to end:
    its corner timed on devices[0] with one device's share of the cores and scaled by FLOPs, then predicted in
    bands on all of `devices` (plan/vae_costs.py). None where the model has no VAE or too few latent rows."""
    from ..models.benchmodels_vae import check_vae_bench

    try:
        check_vae_bench(name, resolution)
    except ValueError:
        return None
    threads = max(1, torch.get_num_threads() // len(devices)) if devices[0] == "cpu" else None
    seconds, decode = measure_bench_vae(name, resolution, devices[0], frames, threads, corner=True)
    try:
        split = predict_decode(decode, seconds, link, len(devices), overhead_s, contention)
    except ValueError:
        return None
    return seconds, split.seconds


def _corner(latent: torch.Tensor) -> torch.Tensor:
    """The latent's first 8 x 8 rows and columns (and first 2 frames of a clip)."""
    corner = latent[..., :8, :8]
    return corner[:, :, :2] if corner.dim() == 5 else corner


def plan_vae_line(name: str, resolution: tuple[int, int], frames: int | None, devices: list, link: Link,
                  overhead_s: float, contention: float = 1.0) -> tuple[str, dict]:
    """`tandem plan --vae`'s line and its JSON: bench model `name`'s VAE decode timed once on devices[0] (on a
    CPU with one device's share of the cores, as `tandem bench --stage vae` runs it) and predicted in bands on
    all of `devices` (overhead_s, contention: the plan's, plan/model.py Inputs); a line saying why not where the model has no VAE or too few latent rows."""
    from ..models.benchmodels_vae import check_vae_bench

    n = len(devices)
    try:
        check_vae_bench(name, resolution)
    except ValueError as exc:
        return f"VAE decode: not predicted: {exc}", {"why_not": str(exc)}
    threads = max(1, torch.get_num_threads() // n) if devices[0] == "cpu" else None
    seconds, decode = measure_bench_vae(name, resolution, devices[0], frames, threads)
    try:
        split = predict_decode(decode, seconds, link, n, overhead_s, contention)
    except ValueError as exc:
        return f"VAE decode: not predicted: {exc}", {"why_not": str(exc)}
    one = predict_decode(decode, seconds, link, 1)
    on = f", {threads} thread(s)" if threads else ""
    line = (f"VAE decode in {vae_grid.words(split.grid)} (a prediction): one device {seconds:.3f} s "
            f"(timed once here{on}), "
            f"{one.memory_bytes / 2**30:.3f} GiB; {n} devices {split.seconds:.3f} s ({split.speedup:.2f}x), "
            f"{split.memory_bytes / 2**30:.3f} GiB per device, {split.peer_bytes / 2**20:.2f} MiB between devices; "
            f"the whole attention {100 * decode.whole_flops / decode.flops:.1f} % of the FLOPs, "
            f"{decode.collectives()} small collectives")
    return line, {"one_device_seconds_measured": seconds, "one_device": one.as_json(), "split": split.as_json()}
