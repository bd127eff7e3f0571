"""How long the host waits for the workers before it declares one hung.

Two signs, both needed because a hung worker looks alive to the operating system:
- a per-call deadline that fits the work: once a kind of call (model, strategy and input shape) has been
  timed a few times, `factor` x its median, at least `floor_s`; before that (the first calls, where compilers
  and allocators warm up) a generous `first_s`; model loads get `load_bound` from the bytes to move;
- a heartbeat: every worker renews a file's time twice a second from its own thread (worker_loop.py); a process
  that is stopped (SIGSTOP, a debugger) or frozen stops renewing it, so one silent for `floor_s` is hung at
  any point of a request, first calls and loads included.
"""

from __future__ import annotations

import statistics
from collections import OrderedDict, deque

MIN_TIMINGS = 3  # timed calls of a kind before its median sets the deadline
KEPT_TIMINGS = 50
KEPT_KINDS = 256
LOAD_FLOOR_S = 120.0
LOAD_BYTES_PER_S = 50e6  # a slow disk or network share: 50 MB/s
SILENT_S = 2.0  # a worker whose heartbeat is older than this is not running (stopped, frozen, gone)


class CallClock:
    """Timings per kind of call and the deadline they give."""

    def __init__(self, factor: float = 10.0, floor_s: float = 20.0, first_s: float = 300.0):
        self.factor, self.floor_s, self.first_s = factor, floor_s, first_s
        self._timings: OrderedDict[object, deque] = OrderedDict()

    def deadline(self, kind) -> tuple[float, str]:
        """(seconds, why) for the next call of this kind."""
        timings = self._timings.get(kind)
        if timings is None or len(timings) < MIN_TIMINGS:
            return self.first_s, "the bound for a kind of call not yet timed"
        median = statistics.median(timings)
        if self.factor * median <= self.floor_s:
            return self.floor_s, f"the floor ({self.factor:g}x this call's median of {median:.3g} s is less)"
        return self.factor * median, f"{self.factor:g}x this call's median of {median:.3g} s"

    def record(self, kind, seconds: float) -> None:
        timings = self._timings.pop(kind, None) or deque(maxlen=KEPT_TIMINGS)
        timings.append(seconds)
        self._timings[kind] = timings  # most recent last; the oldest kinds go first
        while len(self._timings) > KEPT_KINDS:
            self._timings.popitem(last=False)


def load_bound(nbytes: int, first_s: float) -> tuple[float, str]:
    seconds = max(first_s, LOAD_FLOOR_S + nbytes / LOAD_BYTES_PER_S)
    return seconds, f"the bound for loading {nbytes / 2**20:.0f} MiB"
