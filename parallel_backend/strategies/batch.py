"""batch: the rows of a call (batch items, prompts) split over devices in near-equal contiguous chunks. Exact.

With fewer rows than devices some devices get none and sit out that call (correct, just not faster).
"""

from __future__ import annotations

from .base import BenchJob, RowStrategy


class Batch(RowStrategy):
    name = "batch"
    summary = "a contiguous share of the call's rows (images, prompts) on each device."
    bench_job = BenchJob(2, False)


STRATEGY = Batch()
