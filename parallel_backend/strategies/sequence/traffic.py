"""What a rank sent to its peers during sequence-parallel attention, and how long it sat waiting for what it
receives: read by the tests and the bench (the waited time is the part of the exchange not hidden behind
compute)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class Traffic:
    """Counts, for one rank, summed over the attentions it took part in.

    passes: rounds of point-to-point exchange (a ring attention over N ranks takes N-1, a Ulysses attention 2
    all-to-alls); messages and bytes_sent: the non-empty tensors this rank sent and their size."""

    passes: int = 0
    messages: int = 0
    bytes_sent: int = 0
    waited_s: float = 0.0  # blocked in waits for exchanges (NCCL: a wait blocks the host only where it syncs)

    def record(self, sent: list[torch.Tensor]) -> None:
        """One round in which this rank sent `sent` (empty tensors cross nowhere and are not counted)."""
        sent = [t for t in sent if t.numel()]
        self.passes += 1
        self.messages += len(sent)
        self.bytes_sent += sum(t.numel() * t.element_size() for t in sent)


def timed_wait(traffic: Traffic | None, wait, *args):
    """`wait(*args)` (a wait for exchanges), its time added to `traffic.waited_s`."""
    started = time.perf_counter()
    try:
        return wait(*args)
    finally:
        if traffic is not None:
            traffic.waited_s += time.perf_counter() - started
