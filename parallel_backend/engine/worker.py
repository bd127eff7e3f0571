"""The worker program: `python -m parallel_backend.engine.worker --connect HOST:PORT --rank R --world N --device D ...`.

One process per device (runtime/pool.py starts it by this module's name: a process boundary, not an import).
runtime/worker_loop.py is the process (authentication, the process group, the watchdog, the request loop); this
module adds what the engine asks of a worker: a model call whole on this device (Forward), auto's timed call
(TimedForward), a VAE's band of rows (VaeBand, engine/vae.py), a share of a tiled decode's tiles (VaeTiles,
engine/vae_tiles.py), and each strategy's own requests.
"""

from __future__ import annotations

import logging
import os
import sys
import time

if __name__ == "__main__":  # the host's watch first: a host killed while torch loads below leaves nothing behind
    from ..runtime import worker_watch

    worker_watch.start_from_argv(sys.argv[1:])

from .. import models, strategies
from ..models import weight_shards
from ..models.stages import synchronize
from ..runtime.messages import Computed, Forward, TimedForward
from ..runtime.worker_loop import RUNTIME_HANDLERS, WorkerState
from ..runtime.worker_loop import main as run_worker
from .timing import run_timed_forward
from .vae import VaeBand, run_band
from .vae_tiles import VaeTiles, run_tile_share


def forward(state: WorkerState, message: Forward) -> Computed:
    """The whole model call on this worker's device (put back whole first if a strategy had split the model)."""
    import torch

    restoring = state.restores(message.fingerprint)
    module, family = state.whole_model(message.fingerprint)
    started = time.perf_counter()
    with torch.inference_mode():
        compiled = module.__dict__.get("_tandem_compiled")
        # looked up at each call: a test's worker set-up file may wrap it (tests/reliability/test_deadlines.py)
        out = models.forward_for_family(family)(module if compiled is None else compiled, message.call.to(state.device))
    synchronize(state.device)
    extra = {"rows": message.call.rows}
    if restoring:  # a strategy had split the weights: the worker holds the whole model again
        from ..runtime.recipe import weights_bytes

        extra["weights_bytes"] = weights_bytes(module)
    if compiled is not None:  # how many graphs torch.compile made in this worker so far (once per shape)
        from torch._dynamo.utils import counters

        extra["compiled_graphs"] = counters["stats"]["unique_graphs"]
    return Computed(out, time.perf_counter() - started, extra=extra)


def handlers() -> dict:
    """Message type -> handler(state, request): the runtime's, model calls, and every registered strategy's."""
    return {**RUNTIME_HANDLERS, Forward: forward, TimedForward: run_timed_forward, VaeBand: run_band,
            VaeTiles: run_tile_share, **strategies.worker_handlers()}


def main(argv=None) -> int:
    return run_worker(argv, handlers(), {**strategies.worker_cutters(), "shard": weight_shards.cut_on_load})


if __name__ == "__main__":
    code = main()
    # The worker has left its group, closed its channel and removed what it owns. The interpreter's own teardown
    # (torch, diffusers and a model's modules) then takes 2.5 to 4 s per worker on a 2-core machine, and every
    # pool shutdown waits for it: skip it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
