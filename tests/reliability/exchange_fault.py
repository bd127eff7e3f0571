"""Run in each worker by the pool's set-up hook, before any model arrives:
`WorkerPool(..., worker_setup=(this file, "signal_at_exchange", "RANK:K:SIGNAL"))` makes the worker of global
rank RANK send itself SIGNAL as it posts its K-th exchange (counted from 1 since it started), i.e. in the middle
of a ring pass or an all-to-all. Installed only in the pools of the tests that ask for it (primitives.on_exchange)."""

from __future__ import annotations

import itertools
import os
import signal


def signal_at_exchange(spec: str) -> None:
    import torch.distributed as dist

    from parallel_backend import primitives

    rank, at, name = spec.split(":")
    if dist.get_rank() != int(rank):
        return
    counted = itertools.count(1)

    def hook() -> None:
        if next(counted) == int(at):
            os.kill(os.getpid(), getattr(signal, name))

    primitives.on_exchange(hook)
