"""Exact strategies on the pool equal one device: the oracle, over strategy x model x sampler x host."""

from __future__ import annotations

import pytest
import torch

from parallel_backend.engine.oracle import Job, job_for, run_loop
from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.engine.config import ParallelConfig
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.models.sampling import GenerationRequest

pytestmark = pytest.mark.pool

ATOL = 1e-4  # fp32 on CPU; splitting a batch changes the kernels' blocking, so rounding differs slightly


@pytest.fixture(scope="module")
def models():
    return {name: build_bench_model(name) for name in ("tiny", "sd15-narrow", "sdxl-narrow")}


@pytest.mark.parametrize("model_name", ["tiny", "sd15-narrow", "sdxl-narrow"])
@pytest.mark.parametrize("strategy", ["cfg", "batch"])
def test_sampler_loop_on_two_devices_equals_one_device(cpu_pool, models, model_name, strategy):
    model, job = models[model_name], job_for(strategy)
    resolution = (model.default_resolution, model.default_resolution)
    reference = run_loop(model, job, resolution, steps=6, repeats=0).latents
    executor = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", strategy))
    result = run_loop(model, job, resolution, steps=6, repeats=0, executor=executor).latents
    assert result.shape == reference.shape
    torch.testing.assert_close(result, reference, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m", "heun", "euler_a"])
def test_digits_pipeline_with_cfg_split_equals_one_device(cpu_pool, digits_pipeline, scheduler):
    request = GenerationRequest("a handwritten 4", steps=8, cfg=4.0, seed=11, scheduler=scheduler)
    reference = digits_pipeline.generate(request, progress=False)
    with digits_pipeline.parallel(ParallelConfig("cpu:2", "cfg"), pool=cpu_pool) as parallel:
        result = parallel.generate(request, progress=False)
    assert result.model_calls == reference.model_calls  # heun: two calls per step, both split
    torch.testing.assert_close(result.latents, reference.latents, atol=ATOL, rtol=ATOL)


def test_second_job_with_the_same_model_sends_no_weights(cpu_pool, digits_pipeline):
    request = GenerationRequest("a handwritten 9", steps=3, cfg=4.0)
    config = ParallelConfig("cpu:2", "batch")
    with digits_pipeline.parallel(config, pool=cpu_pool) as parallel:
        parallel.generate(request, progress=False)
    shipped, loads = cpu_pool.stats.weights_bytes_shipped, cpu_pool.stats.model_loads
    with digits_pipeline.parallel(config, pool=cpu_pool) as parallel:
        parallel.generate(request, progress=False)
    assert cpu_pool.stats.weights_bytes_shipped == shipped and cpu_pool.stats.model_loads == loads


def test_changed_weights_are_shipped_again(cpu_pool):
    model = build_bench_model("sd15-narrow")
    executor = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "cfg"))
    resolution = (model.default_resolution,) * 2
    run_loop(model, job_for("cfg"), resolution, steps=2, repeats=0, executor=executor)
    loads = cpu_pool.stats.model_loads
    with torch.no_grad():
        model.unet.conv_out.bias.add_(0.5)  # an in-place change, like a merged LoRA
    reference = run_loop(model, job_for("cfg"), resolution, steps=2, repeats=0).latents
    result = run_loop(model, job_for("cfg"), resolution, steps=2, repeats=0, executor=executor).latents
    assert cpu_pool.stats.model_loads == loads + 1
    torch.testing.assert_close(result, reference, atol=ATOL, rtol=ATOL)


def test_batch_times_cfg_on_four_devices_equals_one_device(models):
    from parallel_backend.runtime.pool import WorkerPool

    model, job = models["tiny"], Job(images=2, cfg=4.0)
    resolution = (model.default_resolution,) * 2
    reference = run_loop(model, job, resolution, steps=4, repeats=0).latents
    with WorkerPool("cpu:4") as pool:
        executor = ParallelExecutor(pool, ParallelConfig("cpu:4", "cfg", cfg_degree=2, batch_degree=2))
        result = run_loop(model, job, resolution, steps=4, repeats=0, executor=executor).latents
    torch.testing.assert_close(result, reference, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_parallelized_diffusers_pipeline_equals_plain(cpu_pool, tiny_sd_folder, tiny_sdxl_folder, kind):
    import diffusers

    from parallel_backend.hosts.diffusers import ParallelUNet, parallelize, unparallelize
    from parallel_backend.hosts.diffusers_vae import ParallelVAE

    cls, folder = {"sd": (diffusers.StableDiffusionPipeline, tiny_sd_folder),
                   "sdxl": (diffusers.StableDiffusionXLPipeline, tiny_sdxl_folder)}[kind]
    pipe = cls.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    original_unet = pipe.unet

    original_vae = pipe.vae

    def run(output_type="latent"):
        return pipe("a red door", num_inference_steps=4, guidance_scale=6.0, output_type=output_type,
                    generator=torch.Generator().manual_seed(0)).images

    reference, image = run(), run("pt")
    parallelize(pipe, ParallelConfig("cpu:2", "cfg"), pool=cpu_pool)
    wrapper = pipe.unet
    assert parallelize(pipe) is pipe and pipe.unet is wrapper  # idempotent
    calls = cpu_pool.stats.calls
    result = run()
    assert isinstance(pipe.unet, ParallelUNet) and cpu_pool.stats.calls == calls + 4
    torch.testing.assert_close(result, reference, atol=ATOL, rtol=ATOL)
    assert isinstance(pipe.vae, ParallelVAE) and pipe.vae.calls == 0  # a latent output decodes nothing
    torch.testing.assert_close(run("pt"), image, atol=ATOL, rtol=ATOL)  # decoded in bands of rows on the pool
    assert pipe.vae.calls == 1
    unparallelize(pipe)
    assert pipe.unet is original_unet and pipe.vae is original_vae
    torch.testing.assert_close(run(), reference, atol=0, rtol=0)


def test_each_call_checks_the_pool_and_the_model_once(cpu_pool):
    """One trip per call: the engine alone rejoins left-out machines and makes the workers hold the model, once
    per call; the model ships on the first call only."""
    model = build_bench_model("tiny")
    executor = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "cfg"))
    resolution = (model.default_resolution,) * 2
    run_loop(model, job_for("cfg"), resolution, steps=1, repeats=0, executor=executor)  # the model ships here
    before = dict(vars(cpu_pool.stats))
    result = run_loop(model, job_for("cfg"), resolution, steps=3, repeats=0, executor=executor).latents
    counted = {name: vars(cpu_pool.stats)[name] - before[name]
               for name in ("calls", "rejoin_checks", "model_checks", "model_loads")}
    assert counted == {"calls": 3, "rejoin_checks": 3, "model_checks": 3, "model_loads": 0}
    reference = run_loop(model, job_for("cfg"), resolution, steps=3, repeats=0).latents
    torch.testing.assert_close(result, reference, atol=ATOL, rtol=ATOL)
