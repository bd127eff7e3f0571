"""A test-only stand-in for a slower card: a worker that repeats its heavy compute.

Mixed pools (a fast card beside a slow one) cannot be had on a CPU-only test machine, so a worker can be told to
run every heavy tensor operation (convolutions, matrix products, attention, norms) `factor` times, keeping the
last result: its outputs are unchanged, only slower. It is off unless asked for, by
`WorkerPool(test_slowdown=...)` or the environment variable TANDEM_TEST_SLOWDOWN ("1:2": worker 1 repeats its
compute twice), and never meant for real runs. A worker asked for it runs under it from its start to its end
(runtime/worker_loop.main); a worker not asked wraps nothing. Only the listed operations repeat; pure functions, so repeating
them changes no state.
"""

from __future__ import annotations

import math

from . import environment
from .words import counted

ENV = "TANDEM_TEST_SLOWDOWN"
MAX_FACTOR = 10


def parse(spec, devices: int | None = None) -> dict[int, float]:
    """"1:2" or "1:2,3:1.5" or {1: 2} -> {rank: factor}; factors from 1 to MAX_FACTOR, ranks below `devices`
    (None: not known yet). Raises ValueError saying what to change."""
    if spec is None or spec == "" or spec == {}:
        return {}
    if isinstance(spec, str):
        pairs = []
        for item in (s.strip() for s in spec.split(",") if s.strip()):
            rank, sep, factor = item.partition(":")
            try:
                pairs.append((int(rank), float(factor)))
            except ValueError:
                raise ValueError(f"test slowdown {spec!r}: write RANK:FACTOR pairs such as '1:2' (worker 1 repeats "
                                 "its compute twice, a stand-in for a slower card)") from None
            if not sep:
                raise ValueError(f"test slowdown {spec!r}: write RANK:FACTOR pairs such as '1:2'")
        spec = dict(pairs)
    if not isinstance(spec, dict):
        raise ValueError(f"test slowdown must be text like '1:2' or a dict {{rank: factor}}; got {spec!r}")
    out = {}
    for rank, factor in spec.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"test slowdown: worker {rank!r} is not a worker number (0, 1, ...)")
        if devices is not None and rank >= devices:
            raise ValueError(f"test slowdown names worker {rank}, but the pool has {counted(devices, 'device')} "
                             f"(workers 0 to {devices - 1})")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) \
                or not 1 <= factor <= MAX_FACTOR:
            raise ValueError(f"test slowdown of worker {rank}: factor {factor!r} must be from 1 to {MAX_FACTOR}")
        out[rank] = float(factor)
    return out


def from_environment(devices: int | None = None) -> dict[int, float]:
    return parse(environment.text(ENV), devices)


def repeating(factor: float):
    """A context in which every heavy torch operation runs `factor` times (a fraction: the extra run on that
    share of calls), keeping the last result; a no-op context for factor 1."""
    from contextlib import nullcontext

    if factor <= 1:
        return nullcontext()
    return _mode_class()(factor)


def _heavy():
    import torch
    import torch.nn.functional as F

    return {F.conv2d, F.conv3d, F.linear, F.scaled_dot_product_attention, F.group_norm, F.layer_norm,
            torch.matmul, torch.bmm, torch.baddbmm, torch.einsum, torch.Tensor.matmul, torch.Tensor.__matmul__}


def _mode_class():
    from torch.overrides import TorchFunctionMode

    class Repeat(TorchFunctionMode):
        def __init__(self, factor: float):
            super().__init__()
            self.factor, self.heavy, self.owed = factor, _heavy(), 0.0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in self.heavy and not kwargs.get("out"):
                self.owed += self.factor - 1
                while self.owed >= 1:
                    self.owed -= 1
                    func(*args, **kwargs)
            return func(*args, **kwargs)

    return Repeat

