"""The bench's prediction beside each measured speed-up: `tandem plan`'s model fed only what is measured before
each job's runs: the one-device figures (plan/measure.py, in the bench's process on one device's share of the
cores, as its reference runs) and the pool's link and contention (plan/probe.py, on its workers)."""

from __future__ import annotations

from ..engine import engine_for, sequence_hint
from ..mesh import resolve
from .measure import measure_inputs
from .model import Candidate, predict
from .probe import device_figures, with_contention_at


class Predictor:
    """Measures the pool's link once and its contention before each job; predicts each strategy's speed-up per
    job (inputs measured once per job shape, `measure`, before the bench runs the job)."""

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

    def measure(self, rows: int, branches: int) -> None:
        """The inputs of a job of `rows` rows (`branches` 2: with an uncond branch), measured once, before the
        job's runs: the devices' contention (again for a later job: this machine's pace drifts over minutes;
        the link is kept) and the one-device figures."""
        key = (rows, branches)
        if self.link is None or key in self._inputs:
            return
        if self._inputs:
            self.figures = device_figures(self.engine, self.model, self.resolution, rows, self.link)
        else:
            self.figures = with_contention_at(self.figures, self.engine, self.model, self.resolution, rows)
        inputs = measure_inputs(self.model, self.resolution, rows, branches, self.link, self.n, self.steps)
        self._inputs[key] = self.figures.apply(inputs)

    def predict(self, config, rows: int, branches: int) -> Candidate | None:
        """The plan's candidate for `config` on a job of `rows` rows (None on one device)."""
        if self.link is None:
            return None
        self.measure(rows, branches)
        return predict(self._inputs[(rows, branches)], resolve(config, self.n, branches, rows, self.hint))
