"""What the approximate strategies share: the exact warm-up at the start of a run.

asyncdiff (stages on one-call-stale inputs), patch (DistriFusion: the other bands' activations from the call before)
and pipefusion (PipeFusion: the other patches' keys and values from the call before) each run their first
`warmup` sampler steps exactly, then on stale data. The knob is declared here once and listed by each of them.
"""

from __future__ import annotations

from ..runtime.knobs import Knob
from ..runtime.validation import MAX_STEPS

WARMUP = Knob("warmup", int, 1, "asyncdiff (and the other approximate strategies): exact sampler steps at the start, "
              "before any stale data is used (asyncdiff on 2 stages or more needs at least 1: the later stages start "
              "from what the warm-up hands them)", low=0, high=MAX_STEPS)
