"""ParallelExecutor: runs one model call on a pool according to a ParallelConfig (the host side of a job).

Row strategies (cfg, batch) give each device a share of the call's rows. asyncdiff gives each row share a
group of devices, one per stage: the first call of a model and input shape measures every layer's cost on
one worker, the cut that balances the stages is chosen from it, and each worker keeps only its stage.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import replace

import torch

from .calls import ModelCall
from .config import ParallelConfig
from .models.stages import Profile, describe
from .pool import WorkerPool
from .strategies import asyncdiff, plan_rows

# Per pool: measured profiles (kept across restarts: costs do not change) and the stage setup the workers hold.
_STAGE_STATE: "weakref.WeakKeyDictionary[WorkerPool, dict]" = weakref.WeakKeyDictionary()
_JOBS = itertools.count(1)


class JobTracker:
    """Step and job numbers for hosts that do not say them: a step is a change of timestep (a sampler that
    calls the model twice per step repeats it), a new job begins when the timestep rises or `new_job()`."""

    def __init__(self):
        self.new_job()

    def new_job(self) -> None:
        self.job, self.step, self.last_t = next(_JOBS), -1, None

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
    """`executor(module, family, call, cfg_scale[, fingerprint]) -> output`: ships the model once, splits, gathers."""

    def __init__(self, pool: WorkerPool, config: ParallelConfig):
        self.pool, self.config = pool, config
        self.jobs = JobTracker()

    def degrees(self, cfg_scale: float) -> dict[str, int]:
        return self.config.check_job(len(self.pool.start().devices), cfg_scale)

    @property
    def stage_plan(self) -> dict | None:
        """asyncdiff: the cut the workers hold (layer costs, each stage's share and what it receives)."""
        return _STAGE_STATE.get(self.pool, {}).get("plan")

    def probe_transfer(self, rows: int, repeats: int = 5) -> float:
        """asyncdiff: seconds to hand the first cut's tensors (`rows` rows) from stage 0 to stage 1 alone."""
        plan = self.stage_plan
        specs = [[[rows, *shape], dtype] for shape, dtype in plan["crossing"][0]] + [[[rows], "float64"]]
        replies = self.pool.stage(plan["fingerprint"], "probe", {
            0: {"peer": 1, "send": True, "specs": specs, "repeats": repeats},
            1: {"peer": 0, "send": False, "specs": specs, "repeats": repeats}}, "timing an exchange")
        return replies[1]["transfer_seconds"]

    def new_job(self) -> None:
        """The next call starts a new sampling run (fresh stale state for approximate strategies)."""
        self.jobs.new_job()

    def __call__(self, module: torch.nn.Module, family: str, call: ModelCall, cfg_scale: float,
                 fingerprint: str | None = None) -> torch.Tensor:
        fingerprint = self.pool.ensure_model(module, family, fingerprint)
        degrees = self.degrees(cfg_scale)
        shares = plan_rows(call.rows, call.branches, degrees)
        if self.config.strategy == "asyncdiff":
            return self._staged(fingerprint, self.jobs.place(call), shares, degrees["stages"])
        work = {rank: call.select(rows) for rank, rows in enumerate(shares) if len(rows)}
        outputs = self.pool.call(fingerprint, work, call.index)
        return torch.cat([outputs[rank] for rank in sorted(outputs)]).to(call.x.device, call.x.dtype)

    # ---- asyncdiff ---------------------------------------------------------------------------------------

    def _staged(self, fingerprint: str, call: ModelCall, shares: list[range], stages: int) -> torch.Tensor:
        groups = [(g, rows) for g, rows in enumerate(shares) if len(rows)]
        self._ensure_stages(fingerprint, call.select(groups[0][1]), stages)
        payloads = {}
        for g, rows in groups:
            share = replace(call.select(rows), stream=(*call.stream, "rows", rows.start, rows.stop))
            for k in range(stages):
                payloads[g * stages + k] = share
        replies = self.pool.stage(fingerprint, "call", payloads, f"call {call.index} (step {call.step})")
        self.last_replies = replies  # per rank: compute, wait and bytes sent (for the bench)
        out = torch.cat([replies[g * stages + stages - 1]["out"] for g, _ in groups])
        return out.to(call.x.device, call.x.dtype)

    def _ensure_stages(self, fingerprint: str, sample: ModelCall, stages: int) -> None:
        """Measures the model for this input shape (once), picks the balanced cut, sets up every worker."""
        state = _STAGE_STATE.setdefault(self.pool, {"profiles": {}, "setup": None})
        shape_key = (fingerprint, tuple(sample.x.shape[1:]), str(sample.x.dtype),
                     None if sample.context is None else tuple(sample.context.shape[1:]))
        if shape_key not in state["profiles"]:
            reply = self.pool.stage(fingerprint, "profile", {0: sample}, "measuring the model's layers")[0]
            state["profiles"][shape_key] = Profile(reply["names"], reply["layer_seconds"], reply["crossing"])
        profile = state["profiles"][shape_key]
        config = self.config
        setup_key = (shape_key, stages, config.warmup, config.stride, config.time_shift, self.pool.stats.starts,
                     self.pool.loaded_fingerprint)
        if state["setup"] == setup_key:
            return
        cuts = asyncdiff.balance(profile.seconds, stages)
        n = len(self.pool.devices)
        payloads = {}
        for rank in range(n):
            group, stage = divmod(rank, stages)
            payloads[rank] = {"stage": stage, "stages": stages, "cuts": cuts,
                              "prev": rank - 1 if stage else None, "next": rank + 1 if stage < stages - 1 else None,
                              "warmup": config.warmup, "stride": config.stride, "time_shift": config.time_shift,
                              "crossing": profile.crossing}
        self.pool.stage(fingerprint, "setup", payloads, "placing the stages")
        state["setup"] = setup_key
        state["plan"] = {"cuts": cuts, "fingerprint": fingerprint,
                         "crossing": [profile.crossing[c] for c in cuts], "stages": describe(profile, cuts),
                          "layer_names": profile.names, "layer_seconds": profile.seconds}
