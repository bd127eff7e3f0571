"""pipefusion's messages from the host to its stage workers (answered by runner.PipeRunner). The measuring and
the cut are asyncdiff's (its StagePlan); the message types are pipefusion's own, so each strategy's worker
handles its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..asyncdiff.messages import PlaceStages, ProfileLayers


# what a stage waits for in a call (runner.py's `waits`, the bench's figures): the first patch from the stage before
# (the pipeline's fill), the later ones, its lent blocks' modulation, its own sends at the call's end
WAITS = ("fill", "later", "modulation", "sends")


class ProfileBlocks(ProfileLayers):
    """Time every transformer block of the model on this worker with the call's shapes (the whole sequence)."""


@dataclass(frozen=True)
class PlaceBlocks(PlaceStages):
    """This worker's stage of the blocks (plan: asyncdiff's StagePlan; stride and time shift unused) and every
    block whose modulation another stage holds (`lent`: (block, its stage, the holding stage), cut.StageCut.lent)."""

    lent: tuple = ()


@dataclass(frozen=True)
class PipeCall:
    """One call's share of rows through the chain of stages, its tokens cut into `patches` (1: the whole
    sequence, exact)."""

    fingerprint: str
    call: Any
    patches: int
