"""Run in each worker by the pool's set-up hook, before any model arrives:
`WorkerPool(..., worker_setup=(this file, "signal_at_exchange", "RANK:K:SIGNAL"))` makes the worker of global
rank RANK send itself SIGNAL as it posts its K-th exchange (counted from 1 since it started), i.e. in the middle
of a ring pass or an all-to-all. Installed only in the pools of the tests that ask for it (primitives.on_exchange).
"RANK:K:SIGNAL:FILE" also writes the wall-clock time to FILE just before the signal, so a test can time how long
the host took to name the fault from the fault itself, whatever the restart before it cost."""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path


def signal_at_exchange(spec: str) -> None:
    import torch.distributed as dist

    from parallel_backend.runtime import primitives

    rank, at, name, *told = spec.split(":", 3)
    if dist.get_rank() != int(rank):
        return
    counted = itertools.count(1)

    def hook() -> None:
        if next(counted) == int(at):
            if told:
                Path(told[0]).write_text(repr(time.time()))
            os.kill(os.getpid(), getattr(signal, name))

    primitives.on_exchange(hook)
