"""Worker side of auto's plan (plan/calibrate.py is the host side): the second call of a key runs whole on one
worker, timed there (the first, run there too, has warmed the call's shapes up: a first run pays for
allocations and kernel choices that later calls do not). Its output is the call's real result.

Timed: the whole call (with every attention's shapes and seconds, for a model with a sequence split), and one
row of it where it has more (the row strategies' share; after an untimed run of one row, for the same reason).
"""

from __future__ import annotations

import time

from ..runtime.messages import Computed, TimedForward


def run_timed_forward(worker, message: TimedForward) -> Computed:
    import torch

    from ..models import attention_recorder, forward_for_family
    from ..models.attention_timing import Recorder
    from ..models.stages import synchronize

    module, family = worker.whole_model(message.fingerprint)
    forward, call = forward_for_family(family), message.call.to(worker.device)
    record = attention_recorder(family) if message.attentions else None
    recorder = Recorder()

    def timed(run):
        started = time.perf_counter()
        out = run()
        synchronize(worker.device)
        return out, time.perf_counter() - started

    def whole():
        if record is None:
            return forward(module, call)
        with record(call, recorder) as recorded:
            return forward(module, recorded)

    with torch.inference_mode():
        out, seconds = timed(whole)
        one_row = seconds
        if call.rows > 1:
            row = call.select(range(1))
            forward(module, row)
            one_row = timed(lambda: forward(module, row))[1]
    return Computed(out, seconds, extra={"one_row_s": one_row, "attentions": recorder.seen})
