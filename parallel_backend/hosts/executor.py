"""A host's handle on a pool: a config, the host's job and step numbering, and auto's planner for the engine.

Every host (the ComfyUI nodes, diffusers pipelines, the tiny pipeline, bench) runs its model calls through a
`ParallelExecutor`. It sits above the plan, so it is what hands the engine auto's choices
(`plan.calibrate.auto_plans`) with each call; the engine itself imports nothing of the plan.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

from ..engine.config import ParallelConfig
from ..engine.mesh import Mesh, check_job
from ..engine.pool_engine import CallResult, Engine, engine_for
from ..plan.calibrate import auto_plans
from ..runtime.calls import ModelCall
from ..runtime.devices import resolve_devices


class JobTracker:
    """Step and job numbers for hosts that do not say them: a step is a change of timestep (a sampler that
    calls the model twice per step repeats it), a new job begins when the timestep rises or `new_job()`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.new_job()

    def new_job(self) -> None:
        self.job, self.step, self.last_t = self.engine.next_job(), -1, None

    def place(self, call: ModelCall) -> ModelCall:
        t = float(call.t.reshape(-1)[0]) if call.t.numel() else 0.0
        if call.job is None and self.last_t is not None and t > self.last_t:
            self.new_job()
        if call.step is None and t != self.last_t:
            self.step += 1
        self.last_t = t
        return replace(call, step=call.step if call.step is not None else self.step,
                       job=call.job if call.job is not None else self.job)


class ParallelExecutor:
    """A host's handle on a pool: `executor(module, family, call[, fingerprint]) -> output`, split per `config`.
    `run(...)` returns the CallResult with the call's figures."""

    def __init__(self, pool, config: ParallelConfig):
        self.pool, self.config = pool, config
        self.engine = engine_for(pool)
        self.jobs = JobTracker(self.engine)

    def check_job(self, guided: bool) -> Mesh:
        """The mesh of a job's calls; refuses a job the config cannot serve (e.g. cfg at cfg = 1) before work
        (a pool not started yet stays so: its devices are counted, not started). The devices counted are those
        the pool names, also while it runs without a machine it could not reach (its calls then fit the devices
        left: Engine._named_mesh)."""
        return check_job(self.config, len(resolve_devices(self.pool.requested_devices)), guided)

    def new_job(self) -> None:
        """The next call starts a new sampling run (fresh stale state for approximate strategies)."""
        self.jobs.new_job()

    @contextmanager
    def job(self):
        """One sampling run: a new job whose calls no other thread's calls interleave with (they wait)."""
        with self.engine.job():
            self.jobs.new_job()
            yield self

    def run(self, module, family: str, call: ModelCall, fingerprint: str | None = None, recipe=None,
            needs_split: bool = False) -> CallResult:
        """The call on the pool (Engine.run: what it raises, and what `needs_split` refuses), with auto's planner."""
        return self.engine.run(module, family, self.jobs.place(call), self.config, fingerprint, recipe, needs_split,
                               planner=auto_plans(self.engine))

    def __call__(self, module, family: str, call: ModelCall, fingerprint: str | None = None):
        return self.run(module, family, call, fingerprint).out
