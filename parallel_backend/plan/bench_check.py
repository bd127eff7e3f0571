"""The bench's prediction beside each measured speed-up: `tandem plan`'s model fed only what is measured before
any strategy runs: the one-device figures (plan/measure.py, in the bench's process on one device's share of the
cores, as its reference runs) and the pool's link and contention (plan/probe.py, on its workers)."""

from __future__ import annotations

from dataclasses import replace

from ..bench import sample_call
from ..engine import engine_for, sequence_hint
from ..mesh import resolve
from .measure import measure_inputs
from .model import Candidate, predict
from .probe import device_figures, measure_calls


class Predictor:
    """Measures the pool's devices once; predicts each strategy's speed-up per job (inputs measured once per
    job shape)."""

    def __init__(self, pool, model, resolution: tuple[int, int], steps: int, progress=print):
        self.engine = engine = engine_for(pool)
        self.model, self.resolution, self.steps, self.n = model, resolution, steps, engine.device_count()
        self.figures = device_figures(engine, model, resolution)
        self.link = self.figures.link
        self.hint = sequence_hint(model.module, model.family)
        self._inputs = {}
        if self.link is not None:
            progress(f"[bench] the plan's device inputs: link {self.link.source}; compute {self.figures.contention:.2f}x "
                     f"slower with every device busy (one-row calls; larger calls measured per job); "
                     f"{1000 * self.figures.overhead_s:.1f} ms of pool overhead per call")

    def predict(self, config, rows: int, branches: int) -> Candidate | None:
        """The plan's candidate for `config` on a job of `rows` rows (None on one device)."""
        if self.link is None:
            return None
        key = (rows, branches)
        if key not in self._inputs:
            inputs = measure_inputs(self.model, self.resolution, rows, branches, self.link, self.n, self.steps)
            self._inputs[key] = self._with_contention(rows).apply(inputs)
        return predict(self._inputs[key], resolve(config, self.n, branches, rows, self.hint))

    def _with_contention(self, rows: int):
        """The pool's figures with the contention of calls of `rows` rows measured too (a device of a split may
        compute all of them: asyncdiff's stages, a batch on fewer devices than rows)."""
        known = dict(self.figures.contention_by_rows)
        if rows > 1 and rows not in known:
            fingerprint = self.engine.load(self.model.module, self.model.family)
            known[rows] = measure_calls(self.engine, fingerprint, sample_call(self.model, rows, self.resolution))[0]
            self.figures = replace(self.figures, contention_by_rows=tuple(sorted(known.items())))
        return self.figures
