"""The choice: the candidate predicted fastest, never slower than one device.

A split must be predicted to reach FLOOR x one device to be chosen; when none does, one device runs the call and
the reason says why (the best split's figure and what eats its gain). `exact_only` leaves out the stale
strategies (asyncdiff after warm-up), for callers that promise the one-device output.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import strategies
from .model import Candidate

FLOOR = 1.05  # a predicted gain smaller than this is within the model's error: not worth a pool


@dataclass(frozen=True)
class Choice:
    best: Candidate
    reason: str  # one line: why it wins


def choose(candidates: list[Candidate], exact_only: bool = False) -> Choice:
    """The best of `candidates` (model.candidates: one device among them, best first)."""
    single = next(c for c in candidates if not c.mesh)
    splits = [c for c in candidates if c.mesh and (c.exact or not exact_only) and strategies.get(c.strategy).auto]
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
