"""batch: the rows of a call (batch items, prompts) split over devices in near-equal contiguous chunks. Exact.

With fewer rows than devices some devices get none and sit out that call (correct, just not faster).
"""

from __future__ import annotations

from ..primitives import chunk_sizes

NAME = "batch"
EXACT = True


def partition(rows: range, degree: int, branches: int) -> list[range]:
    parts, start = [], rows.start
    for size in chunk_sizes(len(rows), degree):
        parts.append(range(start, start + size))
        start += size
    return parts
