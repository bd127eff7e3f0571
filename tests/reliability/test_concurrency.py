"""Threads sharing one pool: two threads with two different models, for an exact strategy and for asyncdiff
(whose stale state lives between the calls of a job); one pipeline object shared by two threads."""

from __future__ import annotations

import threading

import pytest
import torch

from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.engine.config import ParallelConfig
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.engine.oracle import Job, LoopResult, run_once
from parallel_backend.runtime.pool import WorkerPool
from parallel_backend.models.sampling import GenerationRequest

pytestmark = pytest.mark.slow

JOBS_PER_THREAD = 4
STEPS = 8


def sample(model, job: Job, executor=None) -> torch.Tensor:
    result = LoopResult()
    run_once(model, job, (model.default_resolution,) * 2, STEPS, result, timed=False, executor=executor)
    return result.latents


def in_threads(work: dict) -> dict:
    """Runs each named function in its own thread, all at once; returns name -> its results or its error."""
    results, start = {}, threading.Barrier(len(work))

    def run(name, function):
        start.wait()
        try:
            results[name] = function()
        except Exception as exc:  # reported by the test
            results[name] = exc

    threads = [threading.Thread(target=run, args=item) for item in work.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    return results


@pytest.mark.parametrize("strategy", ["cfg", "asyncdiff"])
def test_two_threads_with_two_models_on_one_pool_both_finish_right(strategy):
    models = {"digits": build_bench_model("tiny"), "small": build_bench_model("small")}
    models["small"].default_resolution = 64
    job = Job(1, 7.5 if strategy == "cfg" else 1.0)
    with WorkerPool("cpu:2") as pool:
        executors = {name: ParallelExecutor(pool, ParallelConfig("cpu:2", strategy)) for name in models}
        if strategy == "cfg":  # exact: the one-device result
            expected = {name: sample(model, job) for name, model in models.items()}
        else:  # approximate: the result of the same job run alone on the pool
            expected = {name: sample(model, job, executors[name]) for name, model in models.items()}
        results = in_threads({name: (lambda name=name: [sample(models[name], job, executors[name])
                                                        for _ in range(JOBS_PER_THREAD)]) for name in models})
        for name, latents in results.items():
            assert not isinstance(latents, Exception), f"{name}: {latents}"
            for got in latents:
                torch.testing.assert_close(got, expected[name], atol=1e-4, rtol=1e-4)
        assert pool.stats.model_loads == 2, "both models stay loaded: no reload while the threads alternate"
        assert len(pool.loaded_fingerprints) == 2 and not pool.stats.failures


def test_a_third_model_replaces_the_least_recently_used_one():
    models = [build_bench_model("tiny"), build_bench_model("tiny"), build_bench_model("tiny")]
    for seed, model in enumerate(models[1:], start=1):
        torch.manual_seed(seed)
        for parameter in model.unet.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    job = Job(1, 7.5)
    with WorkerPool("cpu:2") as pool:
        executor = ParallelExecutor(pool, ParallelConfig("cpu:2", "cfg"))
        for model in [*models, models[0]]:
            torch.testing.assert_close(sample(model, job, executor), sample(model, job), atol=1e-4, rtol=1e-4)
        assert pool.stats.model_loads == 4 and len(pool.loaded_fingerprints) == 2  # the first came back


def test_a_pipeline_shared_by_two_threads_serializes_its_jobs(digits_pipeline):
    request = GenerationRequest("a handwritten 4", steps=6, cfg=4.0)
    expected = digits_pipeline.generate(request, progress=False).latents
    with digits_pipeline.parallel(ParallelConfig("cpu:2", "cfg")) as shared:
        results = in_threads({name: (lambda: [shared.generate(request, progress=False).latents
                                               for _ in range(JOBS_PER_THREAD)]) for name in ("a", "b")})
    for name, latents in results.items():
        assert not isinstance(latents, Exception), f"{name}: {latents}"
        for got in latents:
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_parallelized_diffusers_pipeline_shared_by_two_threads(tiny_sd_folder):
    from parallel_backend.hosts.diffusers import DiffusersPipeline, parallelize, unparallelize

    pipe = DiffusersPipeline.load(tiny_sd_folder, "cpu").pipe
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe(prompt="a lighthouse", num_inference_steps=5, guidance_scale=5.0, output_type="latent",
                    generator=torch.Generator("cpu").manual_seed(3)).images

    expected = generate()
    parallelize(pipe, ParallelConfig("cpu:2", "cfg"))
    try:
        assert type(pipe).__name__ == "StableDiffusionPipeline"
        results = in_threads({name: (lambda: [generate() for _ in range(JOBS_PER_THREAD)]) for name in ("a", "b")})
        calls = pipe.unet.calls
    finally:
        unparallelize(pipe)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and not hasattr(type(pipe), "_tandem_base")
    for name, latents in results.items():
        assert not isinstance(latents, Exception), f"{name}: {latents}"
        for got in latents:
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert calls == 2 * JOBS_PER_THREAD * 5  # every call of both threads went through the pool
