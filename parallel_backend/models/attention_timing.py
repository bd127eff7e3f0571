"""Timing the attentions of one model call, for auto's plan (plan/calibrate.py): each attention's query and key
shapes and its seconds, taken through the host's attention entry point while the whole model runs on one device.

Each adapter that can say it has `record_attention(call, recorder)`, a context that yields the call to run:
ComfyUI's models get an `optimized_attention_override` in the call's transformer_options (ComfyUI's attention
hands every call to it); diffusers' models call `torch.nn.functional.scaled_dot_product_attention` by attribute
(diffusers' native attention backend), which is wrapped in this worker's own process for the length of the call.
A model whose attention goes another way (another backend, a custom processor) records nothing: the plan then
predicts no split by tokens for it.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Attention:
    """One attention of the call: rows (the batch), heads, query and key lengths, head width, bytes per element,
    and its seconds on this device."""

    rows: int
    heads: int
    queries: int
    keys: int
    head_dim: int
    itemsize: int
    seconds: float


class Recorder:
    """Collects the call's attentions (`seen`) as they run."""

    def __init__(self):
        self.seen: list[Attention] = []

    def timed(self, run, q, k, heads_first: bool, heads: int | None = None):
        """run() timed; q, k: (B, H, L, D) when heads_first, else (B, L, H*D) with `heads` given."""
        _synchronize(q)
        started = time.perf_counter()
        out = run()
        _synchronize(q)
        seconds = time.perf_counter() - started
        if heads_first:
            shape = (q.shape[0], q.shape[1] if q.dim() == 4 else 1, q.shape[-2], k.shape[-2], q.shape[-1])
        else:
            shape = (q.shape[0], heads, q.shape[1], k.shape[1], q.shape[-1] // heads)
        self.seen.append(Attention(*(int(v) for v in shape), q.element_size(), seconds))
        return out


def _synchronize(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


@contextmanager
def torch_attention_recorded(recorder: Recorder):
    """While inside, every call of `torch.nn.functional.scaled_dot_product_attention` in this process is timed
    (q, k, v: (B, H, L, D)); the function is put back after."""
    original = torch.nn.functional.scaled_dot_product_attention

    def timed(query, key, value, *args, **kwargs):
        return recorder.timed(lambda: original(query, key, value, *args, **kwargs), query, key, heads_first=True)

    torch.nn.functional.scaled_dot_product_attention = timed
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def comfy_override(recorder: Recorder):
    """A ComfyUI `optimized_attention_override` (its signature: ComfyUI's attention `func`, then its inputs;
    q, k, v: (B, L, H*D), or (B, H, L, D) with skip_reshape) that times every attention ComfyUI makes."""

    def override(func, q, k, v, heads, *args, **kwargs):
        skip_reshape = kwargs.get("skip_reshape", args[2] if len(args) > 2 else False)
        return recorder.timed(lambda: func(q, k, v, heads, *args, **kwargs), q, k, heads_first=bool(skip_reshape),
                              heads=int(heads))

    return override
