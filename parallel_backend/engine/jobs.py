"""What `tandem bench` samples for each strategy (a Job: images and guidance), known before any model is built, so
the bench's inputs are checked without torch (commands/bench_inputs.py); engine/oracle.py runs the jobs."""

from __future__ import annotations

from dataclasses import dataclass

from .. import strategies

CFG_SCALE = 7.5


@dataclass(frozen=True)
class Job:
    """What is sampled: `images` latents, with guidance `cfg` (1: no uncond branch)."""

    images: int
    cfg: float


def job_for(strategy: str, cfg: float | None = None, images: int | None = None) -> Job:
    """The job `tandem bench` measures a strategy on (its BenchJob): cfg 7.5 when it is guided, else 1; `cfg`
    (tandem bench --cfg) sets the guidance of every job (1: no uncond branch), `images` (--images) its images."""
    bench_job = strategies.get(strategy).bench_job
    return Job(images or bench_job.images, cfg if cfg is not None else (CFG_SCALE if bench_job.guided else 1.0))
