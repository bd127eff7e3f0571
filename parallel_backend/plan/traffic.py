"""Bytes that cross devices in one model call, per strategy and mesh, from the call's shapes. Pure.

Two kinds of traffic:
- host: the host ships each device the rows it computes (every device of a sequence group or a chain of
  stages gets its group's rows) and takes one prediction per row group back;
- peer: what devices send each other during the call, every rank's sends summed (what the sequence
  strategies' counters, strategies/sequence/traffic.py, count):
  - ulysses over u ranks: q, k, v out and the output back, each (u-1)/u of every rank's share: 4 L W (u-1)/u
    per attention per row (L tokens, W = heads x head width, in the call's dtype);
  - ring over r ranks: every rank forwards r-1 key/value blocks: 2 L W (r-1) per attention per row;
  - usp (r x u): both, the ring passing blocks of W/u heads of a subgroup's tokens: the same two sums;
  - all three gather the output at the end: each rank's piece to the other N-1: (N-1) x the output;
  - asyncdiff: each stage after the first receives what crosses its cut (the hidden state and the open skip
    connections, per row: measured by the layer profiler), once per exchanging call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CallShape:
    """One model call's sizes; bytes are per row of the call, in the call's dtype.

    rows: rows of the call (images x branches); input_bytes: what the host ships a device per row (latents,
    text, per-row extras); output_bytes: the prediction per row. Sequence models: tokens (the joint sequence
    one attention mixes, per row), width (heads x head width of q, k and v), heads, attentions (token-mixing
    attentions per call), itemsize (bytes per element). UNets: handover_bytes[i], what crosses a cut before
    layer i per row (asyncdiff)."""

    rows: int
    input_bytes: int
    output_bytes: int
    tokens: int = 0
    width: int = 0
    heads: int = 0
    attentions: int = 0
    itemsize: int = 4
    handover_bytes: tuple[int, ...] = ()

    @property
    def qkv_bytes(self) -> int:
        """One of q, k, v for the whole sequence of one row."""
        return self.tokens * self.width * self.itemsize


@dataclass(frozen=True)
class Traffic:
    """Bytes per call: host_in (host to devices), host_out (back), peer (between devices, all ranks summed)."""

    host_in: int = 0
    host_out: int = 0
    peer: int = 0

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.host_in + other.host_in, self.host_out + other.host_out, self.peer + other.peer)


def group_rows(mesh, shape: CallShape, branches: int) -> list[int]:
    """Rows of each row group of `mesh` (cfg x batch cells, in order)."""
    return [len(share) for share in mesh.row_shares(shape.rows, branches)]


def host_traffic(mesh, shape: CallShape, branches: int) -> Traffic:
    """Every device of a row group gets the group's rows; one prediction per group comes back."""
    rows = group_rows(mesh, shape, branches)
    return Traffic(sum(r * shape.input_bytes * mesh.inner for r in rows if r),
                   sum(r * shape.output_bytes for r in rows))


def ulysses_bytes(shape: CallShape, degree: int) -> int:
    """One attention of one row over `degree` ranks: q, k, v out and the output back, all ranks summed."""
    return 4 * shape.qkv_bytes * (degree - 1) // degree


def ring_bytes(shape: CallShape, degree: int) -> int:
    """One attention of one row around a ring of `degree` ranks (or subgroups): k and v, degree - 1 times."""
    return 2 * shape.qkv_bytes * (degree - 1)


def gather_bytes(shape: CallShape, degree: int) -> int:
    """The output of one row gathered on every rank of a group of `degree`."""
    return shape.output_bytes * (degree - 1)


def sequence_peer(shape: CallShape, ulysses: int, ring: int) -> int:
    """Peer bytes of one row in a sequence group of ulysses x ring ranks (ring 1: ulysses; ulysses 1: ring)."""
    per_attention = ulysses_bytes(shape, ulysses) + ring_bytes(shape, ring)
    return shape.attentions * per_attention + gather_bytes(shape, ulysses * ring)


def handover_peer(shape: CallShape, cuts: list[int], rows: int) -> int:
    """What a chain of stages cut before layers `cuts` hands over in one exchanging call of `rows` rows."""
    return rows * sum(shape.handover_bytes[c] for c in cuts)


def per_rank(total: int, degree: int) -> int:
    """The largest rank's share of `total` split over `degree` ranks (shards are near-equal)."""
    return math.ceil(total / degree)
