"""cfg: the unconditional and conditional branches on different devices. Exact.

A call with classifier-free guidance holds its rows as [uncond; cond] (two equal halves); with degree 2 each
half goes to its own device (or row group), and the host concatenates the two predictions in that order.
"""

from __future__ import annotations

from .base import BenchJob, RowStrategy


class Cfg(RowStrategy):
    name = "cfg"
    summary = "cond and uncond on different devices (then batch over the devices left)."
    default_cfg_degree = 2
    bench_job = BenchJob(1, True)

    def partition(self, rows: range, degree: int, branches: int, weights=None) -> list[range]:
        """The [uncond; cond] halves (`weights` cannot move rows between branches: ignored)."""
        if degree == 1:
            return [rows]
        if degree != 2:
            raise ValueError(f"cfg degree {degree}: there are only two branches (cond, uncond); use 1 or 2")
        if branches != 2 or len(rows) % 2:
            raise ValueError("cfg degree 2 needs a call holding both branches ([uncond; cond]); this call has "
                             f"{len(rows)} rows of {branches} branch(es): with cfg=1 use strategy 'batch'")
        half = len(rows) // 2
        return [range(rows.start, rows.start + half), range(rows.start + half, rows.stop)]


STRATEGY = Cfg()
