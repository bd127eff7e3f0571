"""What a sequence group's exchanges cost alone, nothing else running: the bench's measure of how much of the
exchange a call hid behind compute (1 - the time the ranks sat waiting / this time).

The probe sends what one rank sent in one call (its bytes, in as many rounds as it made passes) as all-to-alls
of zeros over the group's ranks. On 2 ranks that is exactly a call's pattern (ring and Ulysses both swap with
the one peer); on more, a ring pass goes to one neighbour while the probe spreads each round over all peers,
the same bytes over more links, so the probe reads low there and the hidden share with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ProbeExchange:
    """Every rank of `peers` (this one is peers[index]) swaps `round_bytes` per peer, `rounds` times, timed
    `repeats` times (the first a warm-up); the reply is the fastest repeat's seconds."""

    peers: tuple[int, ...]
    index: int
    rounds: int
    round_bytes: int
    repeats: int = 4


def probe_plan(mesh, rank_bytes: int, passes: int, repeats: int = 4) -> dict[int, ProbeExchange]:
    """The probe's messages for the first sequence group of `mesh`, replaying one rank's call: `rank_bytes`
    sent in `passes` rounds."""
    peers = tuple(mesh.ranks(0))
    rounds = max(1, passes)
    per_peer = max(4, rank_bytes // rounds // max(1, len(peers) - 1))
    return {rank: ProbeExchange(peers, i, rounds, per_peer, repeats) for i, rank in enumerate(peers)}


def run_probe(worker, message: ProbeExchange) -> dict:
    """Worker side of `ProbeExchange`."""
    import torch

    from ...runtime import primitives
    from ...models.stages import synchronize

    n = len(message.peers)
    piece = torch.zeros(message.round_bytes // 4, device=worker.device)
    shapes = [tuple(piece.shape)] * n
    times = []
    for _ in range(message.repeats):
        synchronize(worker.device)
        started = time.perf_counter()
        for _ in range(message.rounds):
            primitives.all_to_all([piece] * n, shapes, list(message.peers), message.index, worker.device)
        synchronize(worker.device)
        times.append(time.perf_counter() - started)
    return {"transfer_seconds": min(times[1:] or times)}
