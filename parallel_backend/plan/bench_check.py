"""The bench's prediction beside each measured speed-up: `tandem plan`'s model fed only what is measured apart
from the runs it predicts: the one-device figures (plan/measure.py, in the bench's process on one device's share
of the cores, as its reference runs) and the pool's link and contention (plan/probe.py, on its workers).

This machine's pace drifts by tens of percent over seconds to minutes, so the drift-prone inputs are measured
as the bench measures its variants: in turns. Before a job's runs, a first set of rounds (the whole calls and a
sequence rank's share taking turns; each rank alone, then all at once); then one more round of each in every
repeat of the job's rotation (`sample`), beside the variants, never inside their timings. The link is measured
once; the layer profile and the attention once per job.
"""

from __future__ import annotations

from dataclasses import replace

from ..engine.pool_engine import engine_for, sequence_hint
from ..engine.mesh import resolve
from ..engine.oracle import sample_call
from .measure import add_round, device_share, measure_timed, paced_calls
from .model import Candidate, predict
from .probe import DeviceFigures, call_round, call_rounds, contention_and_overhead, measure_link


class Predictor:
    """Measures the pool's link once; per job, its inputs before the job's runs and again in each repeat;
    predicts each strategy's speed-up from them."""

    def __init__(self, pool, model, resolution: tuple[int, int], steps: int, progress=print):
        self.engine = engine = engine_for(pool)
        self.model, self.resolution, self.steps, self.n = model, resolution, steps, engine.device_count()
        self.progress = progress
        self.link = measure_link(engine)
        self.hint = sequence_hint(model.module, model.family)
        self._jobs = {}  # (rows, branches) -> _JobInputs
        if self.link is not None:
            self.fingerprint = engine.load(model.module, model.family)

    def measure(self, rows: int, branches: int) -> None:
        """The inputs of a job of `rows` rows (`branches` 2: with an uncond branch), first measured before the
        job's runs (once)."""
        key = (rows, branches)
        if self.link is None or key in self._jobs:
            return
        self._jobs[key] = job = _JobInputs(self, rows, branches)
        if len(self._jobs) == 1:
            figures = job.figures()
            self.progress(f"[bench] the plan's device inputs: link {self.link.source}; compute "
                          f"{figures.contention:.2f}x slower with every device busy (one-row calls; measured again "
                          f"with each job, and for its larger calls); {1000 * figures.overhead_s:.1f} ms of pool "
                          f"overhead per call")

    def sample(self, rows: int, branches: int) -> None:
        """One more round of the job's inputs (call it once per repeat of the job's rotation)."""
        if self.link is not None:
            self.measure(rows, branches)
            self._jobs[(rows, branches)].add_round()

    def predict(self, config, rows: int, branches: int) -> Candidate | None:
        """The plan's candidate for `config` on a job of `rows` rows (None on one device)."""
        if self.link is None:
            return None
        self.measure(rows, branches)
        inputs = self._jobs[(rows, branches)].inputs()
        if config.memory_per_device is not None:  # pipefusion cuts within it
            inputs = replace(inputs, stage_cap_bytes=int(config.memory_per_device * 2**30))
        return predict(inputs, resolve(config, self.n, branches, rows, self.hint))


class _JobInputs:
    """One job's inputs: the one-device timed rounds (measure.measure_timed) and the pool's call rounds
    (probe.call_round) for one-row calls and for calls of the job's rows."""

    def __init__(self, predictor: Predictor, rows: int, branches: int):
        p = self.predictor = predictor
        self.base, self.runs, self.times = measure_timed(p.model, p.resolution, rows, branches, p.link, p.n, p.steps)
        self.calls = {r: sample_call(p.model, r, p.resolution) for r in sorted({1, rows})}
        self.rounds = call_rounds(p.engine, p.fingerprint, self.calls)  # before the job's runs
        self.device = next(p.model.module.parameters()).device.type

    def add_round(self) -> None:
        p = self.predictor
        with device_share(self.device, p.n):
            add_round(self.runs, self.times)
        for r, call in self.calls.items():
            self.rounds[r].append(call_round(p.engine, p.fingerprint, call))

    def figures(self) -> DeviceFigures:
        contention, overhead = contention_and_overhead(self.rounds[1])
        larger = tuple((r, contention_and_overhead(rounds)[0]) for r, rounds in self.rounds.items() if r > 1)
        return DeviceFigures(self.predictor.link, contention, overhead, larger)

    def inputs(self):
        return self.figures().apply(paced_calls(self.base, self.times))
