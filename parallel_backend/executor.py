"""ParallelExecutor: runs one model call on a pool according to a ParallelConfig (the host side of a job)."""

from __future__ import annotations

import torch

from .calls import ModelCall
from .config import ParallelConfig
from .pool import WorkerPool
from .strategies import plan_rows


class ParallelExecutor:
    """`executor(module, family, call, cfg_scale[, fingerprint]) -> output`: ships the model once, splits, gathers."""

    def __init__(self, pool: WorkerPool, config: ParallelConfig):
        self.pool, self.config = pool, config

    def degrees(self, cfg_scale: float) -> dict[str, int]:
        cfg_degree, batch_degree = self.config.check_job(len(self.pool.start().devices), cfg_scale)
        return {"cfg": cfg_degree, "batch": batch_degree}

    def __call__(self, module: torch.nn.Module, family: str, call: ModelCall, cfg_scale: float,
                 fingerprint: str | None = None) -> torch.Tensor:
        fingerprint = self.pool.ensure_model(module, family, fingerprint)
        shares = plan_rows(call.rows, call.branches, self.degrees(cfg_scale))
        work = {rank: call.select(rows) for rank, rows in enumerate(shares) if len(rows)}
        outputs = self.pool.call(fingerprint, work, call.index)
        return torch.cat([outputs[rank] for rank in sorted(outputs)]).to(call.x.device, call.x.dtype)
