"""asyncdiff's messages from the host to its stage workers (answered by runner.StageRunner)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StagePlan:
    """One worker's part of a cut: its stage, the cut points, its neighbours' ranks (None at the ends), the
    schedule's knobs, and what crosses every possible cut (per row: [(shape[1:], dtype), ...], h first)."""

    stage: int
    stages: int
    cuts: tuple[int, ...]
    prev: int | None
    next: int | None
    warmup: int
    stride: int
    time_shift: bool
    crossing: tuple


@dataclass(frozen=True)
class ProfileLayers:
    """Time every layer of the model on this worker with the call's shapes."""

    fingerprint: str
    call: Any


@dataclass(frozen=True)
class PlaceStages:
    """A worker's stage of the cut, and the layers (indices) whose weights it streams from host memory each call
    instead of holding them (schedule.streamed), within `cap` bytes of weights on its device (None: no cap)."""

    fingerprint: str
    plan: StagePlan
    streamed: tuple[int, ...] = field(default=(), kw_only=True)  # by keyword: pipefusion's PlaceBlocks adds its own
    cap: int | None = field(default=None, kw_only=True)


@dataclass(frozen=True)
class StageCall:
    fingerprint: str
    call: Any


@dataclass(frozen=True)
class ProbeExchange:
    """Time handing tensors of `specs` ([(shape, dtype name)]) to (send) or from rank `peer`, nothing else running."""

    fingerprint: str
    peer: int
    send: bool
    specs: tuple
    repeats: int = 5
