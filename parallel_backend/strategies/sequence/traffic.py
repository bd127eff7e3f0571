"""What a rank sent to its peers during sequence-parallel attention: read by the tests and, later, the bench."""

from __future__ import annotations

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

    def record(self, sent: list[torch.Tensor]) -> None:
        """One round in which this rank sent `sent` (empty tensors cross nowhere and are not counted)."""
        sent = [t for t in sent if t.numel()]
        self.passes += 1
        self.messages += len(sent)
        self.bytes_sent += sum(t.numel() * t.element_size() for t in sent)
