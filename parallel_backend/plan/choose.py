"""The choice: the candidate predicted fastest, never slower than one device.

A split must be predicted to reach FLOOR x one device to be chosen; when none does, one device runs the call and
the reason says why (the best split's figure and what eats its gain). `exact_only` leaves out the stale
strategies (asyncdiff after warm-up), for callers that promise the one-device output.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import strategies
from .model import Candidate
from ..runtime.words import counted

FLOOR = 1.05  # a predicted gain smaller than this is within the model's error: not worth a pool


@dataclass(frozen=True)
class Choice:
    best: Candidate
    reason: str  # one line: why it wins


def choose(candidates: list[Candidate], exact_only: bool = False) -> Choice:
    """The best of `candidates` (model.candidates: one device among them, best first). Where they carry a memory
    budget (`fits`), only those that fit count, tensor among them; when none fits, `NothingFits` says the
    smallest need."""
    budgeted = any(c.fits is not None for c in candidates)
    if budgeted and not any(c.fits for c in candidates):
        raise NothingFits(candidates)
    single = next(c for c in candidates if not c.mesh)
    splits = [c for c in candidates if c.mesh and (c.exact or not exact_only) and c.fits is not False
              and (strategies.get(c.strategy).auto or budgeted)]
    if not single.fits and budgeted:  # the whole model does not fit one device: the fastest split that fits
        if not splits:
            raise NothingFits(candidates)
        top = max(splits, key=lambda c: (round(c.predicted_speedup, 3), c.exact, -c.devices))
        return Choice(top, f"{top.label()} at {top.predicted_speedup:.2f}x predicted: one device cannot hold "
                           f"{single.memory_bytes_per_device / 2**30:.2f} GiB; it needs "
                           f"{top.memory_bytes_per_device / 2**30:.2f} GiB per device ({top.reason})")
    if not splits:
        return Choice(single, "one device: no strategy can split this model on these devices")
    top = max(splits, key=lambda c: (round(c.predicted_speedup, 3), c.exact, -c.devices))
    if top.predicted_speedup < FLOOR:
        return Choice(single, f"one device: no split is predicted to reach {FLOOR:g}x; the best, {top.label()}, "
                              f"gives {top.predicted_speedup:.2f}x ({top.reason})")
    rest = [c for c in splits if c is not top]
    runner_up = f"; next: {rest[0].label()} at {rest[0].predicted_speedup:.2f}x" if rest else ""
    kind = "exact" if top.exact else "stale"
    return Choice(top, f"{top.label()} wins at {top.predicted_speedup:.2f}x predicted ({kind}): {top.reason}{runner_up}")


class NothingFits(ValueError):
    """No candidate fits the memory per device: one sentence naming the smallest need and its devices."""

    def __init__(self, candidates: list[Candidate]):
        least = min(candidates, key=lambda c: (c.memory_bytes_per_device, -c.predicted_speedup))
        self.least = least
        super().__init__(f"nothing fits the memory per device: the smallest need is "
                         f"{least.memory_bytes_per_device / 2**30:.2f} GiB per device, {least.label()} on "
                         f"{counted(least.devices, 'device')}; raise --memory-per-device or add devices")
