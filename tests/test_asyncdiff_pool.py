"""asyncdiff on a pool of CPU workers: its exact modes equal one device, its state never leaks between
streams or jobs, a failing stage does not hang, and on the digits model it keeps the digits readable."""

from __future__ import annotations

import time

import pytest
import torch

from parallel_backend.engine.oracle import Job, job_for, psnr, run_loop
from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.runtime.calls import ModelCall
from parallel_backend.engine.config import ParallelConfig
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.models.diffusers_unet import FAMILY
from parallel_backend.runtime.pool import WorkerError, WorkerPool
from parallel_backend.runtime.recipe import weights_bytes
from parallel_backend.models.sampling import GenerationRequest
from parallel_backend.tiny.classifier import digit_accuracy
from parallel_backend.tiny.prompts import prompt_for

pytestmark = pytest.mark.slow

ATOL = 1e-4


def stage_plan(executor) -> dict:
    """The cut the pool's workers hold, as asyncdiff's host side recorded it."""
    from parallel_backend import strategies

    return strategies.get("asyncdiff").stage_plan(executor.engine)
STEPS = 6


@pytest.fixture(scope="module")
def models():
    return {name: build_bench_model(name) for name in ("tiny", "sd15-narrow", "sdxl-narrow")}


@pytest.mark.parametrize("model_name", ["tiny", "sd15-narrow", "sdxl-narrow"])
def test_warm_up_covering_every_step_equals_one_device(cpu_pool, models, model_name):
    model, job = models[model_name], job_for("asyncdiff")
    resolution = (model.default_resolution,) * 2
    reference = run_loop(model, job, resolution, steps=STEPS, repeats=0).latents
    executor = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "asyncdiff", warmup=STEPS, weights="sharded"))
    result = run_loop(model, job, resolution, steps=STEPS, repeats=0, executor=executor).latents
    torch.testing.assert_close(result, reference, atol=ATOL, rtol=ATOL)
    stages = stage_plan(executor)["stages"]
    assert len(stages) == 2 and all(s["count"] > 0 for s in stages)
    assert sorted(cpu_pool.peak_memory) == [0, 1] and min(cpu_pool.peak_memory.values()) > 0
    # each stage holds its own layers only, and under sharded weights at most the cap (an even share plus 10%):
    # what a stage holds and what it streams from host memory together are the model
    whole, plan = weights_bytes(model.module), stage_plan(executor)
    held = cpu_pool.weights_bytes[plan["fingerprint"]]
    assert sorted(held) == [0, 1] and max(held.values()) <= plan.get("weights_cap", whole) < whole
    assert sorted(held.values()) == sorted(plan.get("stage_weights", held.values()))
    assert whole <= sum(held.values()) + plan.get("streamed_bytes", 0)
    assert plan["weights_cap"] == int(whole * 0.6)


@pytest.mark.parametrize("weights,memory", [("sharded", None), ("replicated", 0.004)])
def test_a_stage_streaming_its_last_layers_equals_one_holding_them(cpu_pool, models, weights, memory, monkeypatch):
    """sd15's weights sit in its low-resolution middle, which takes little time: the stage cut balanced on time
    leaves one stage most of them. Capped (sharded: an even share plus 10%; or a memory per device), it streams its
    last layers from host memory each call, and computes what the stage holding them computes, after warm-up
    too; the pool's stages hold at most the cap between calls, and say which layers they stream."""
    model, job = models["sd15-narrow"], job_for("asyncdiff")
    resolution = (model.default_resolution,) * 2
    held_all = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "asyncdiff", warmup=1))
    reference = run_loop(model, job, resolution, steps=STEPS, repeats=0, executor=held_all).latents
    assert not stage_plan(held_all).get("streamed")
    capped = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "asyncdiff", warmup=1, weights=weights,
                                                       memory_per_device=memory))
    said = []
    monkeypatch.setattr(capped.engine, "say", said.append)
    result = run_loop(model, job, resolution, steps=STEPS, repeats=0, executor=capped).latents
    assert torch.equal(result, reference)
    plan = stage_plan(capped)
    cap = plan["weights_cap"] if memory is None else int(memory * 2**30)
    held = cpu_pool.weights_bytes[plan["fingerprint"]]
    assert plan["streamed"] and max(held.values()) <= cap == plan["weights_cap"]
    assert any("asyncdiff streams" in line and "from host memory each call" in line for line in said), said


def test_a_whole_forward_after_the_stages_puts_the_model_back(cpu_pool, models):
    """cfg on the same model after asyncdiff parked each stage's other layers: the workers run it whole again."""
    model = models["sd15-narrow"]
    resolution = (model.default_resolution,) * 2
    staged = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "asyncdiff", warmup=2))
    run_loop(model, job_for("asyncdiff"), resolution, steps=2, repeats=0, executor=staged)
    job = job_for("cfg")
    reference = run_loop(model, job, resolution, steps=2, repeats=0).latents
    whole = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "cfg"))
    torch.testing.assert_close(run_loop(model, job, resolution, steps=2, repeats=0, executor=whole).latents,
                               reference, atol=ATOL, rtol=ATOL)
    # the stage cut is held apart from the whole model (a fingerprint of its own): each keeps its placement
    assert set(cpu_pool.weights_bytes[cpu_pool.loaded_fingerprint].values()) == {weights_bytes(model.module)}
    staged_held = cpu_pool.weights_bytes[stage_plan(staged)["fingerprint"]]
    assert stage_plan(staged)["fingerprint"] != cpu_pool.loaded_fingerprint
    assert max(staged_held.values()) < weights_bytes(model.module)
    again = run_loop(model, job_for("asyncdiff"), resolution, steps=2, repeats=0, executor=staged).latents
    torch.testing.assert_close(again, run_loop(model, job_for("asyncdiff"), resolution, steps=2, repeats=0).latents,
                               atol=ATOL, rtol=ATOL)


def test_a_stage_cut_loads_in_host_memory_and_a_device_never_holds_more_than_a_layer_or_its_stage(models):
    """asyncdiff's cut on load (runtime/worker_loop.py ON_HOST): the worker's model stays in host memory; the
    profile brings one layer at a time (and the shared modules) to the device, then puts the very same host
    tensors back; the stage setup moves only its own layers, the others parked without a copy. The meta device
    stands in for a GPU: what is on it is what a GPU would hold."""
    import copy

    from parallel_backend.engine.oracle import sample_call
    from parallel_backend.models.stages import modules_of
    from parallel_backend.runtime.worker_loop import ON_HOST, _materialize
    from parallel_backend.strategies.asyncdiff import STRATEGY, balance
    from parallel_backend.strategies.asyncdiff.messages import PlaceStages, ProfileLayers, StagePlan
    from parallel_backend.strategies.asyncdiff.runner import StageRunner

    model = models["sd15-narrow"]
    meta = torch.device("meta")
    module = _materialize(copy.deepcopy(model.module), meta,
                          lambda m: STRATEGY.cut_on_load(None, m, model.family, ("asyncdiff", (0,), 0)))
    assert module.__dict__[ON_HOST] and all(t.device.type == "cpu" for t in module.parameters())
    originals = {name: t for name, t in module.named_parameters()}
    runner = StageRunner(module, model.family, meta)
    assert runner.held_bytes() == 0
    shared = sum(weights_bytes(m) for m in runner.adapter.shared_modules(module))
    seen = []
    for layer in runner.layers:
        for m in layer.modules:
            if m is not None:
                m.register_forward_pre_hook(lambda *_: seen.append(runner.held_bytes()))
    largest = max(sum(weights_bytes(m) for m in layer.modules if m is not None) for layer in runner.layers)
    measured = runner.profile(ProfileLayers("fp", sample_call(model, 1, (model.default_resolution,) * 2)))
    assert seen and max(seen) <= largest + shared < weights_bytes(module) / 2, (max(seen), largest, shared)
    assert all(originals[name] is t for name, t in module.named_parameters())  # nothing copied back
    cuts = tuple(balance(measured["layer_seconds"], 2, None))
    plan = StagePlan(0, 2, cuts, None, 1, 1, 1, False, tuple(tuple(c) for c in measured["crossing"]))
    runner.setup(PlaceStages("fp", plan))
    mine = {id(t) for m in modules_of(runner.mine) for t in m.parameters()}
    parked = runner.placement.parked
    assert parked and all(t.device.type == "cpu" for t in parked.values())
    # the other stage's weights never left host memory: parked as the very tensors loaded
    assert {id(t) for t in parked.values()} <= {id(t) for t in originals.values()}
    assert weights_bytes(module, meta) - sum(t.numel() * t.element_size() for t in parked.values()) \
        <= sum(weights_bytes(m) for m in modules_of(runner.mine)) + shared
    assert mine and all(t.device == meta for m in modules_of(runner.mine) for t in m.parameters())


def test_a_streamed_layer_is_on_the_device_only_for_its_run_even_when_the_call_fails(models):
    """On the meta device (standing in for a GPU, as above): a stage's streamed layers stay parked; in a call each
    reaches the device for its own run with at most the next one arriving beside it (none where the cap leaves
    room for one), and every one is back to its placeholder when the call ends, a failed one too, the parked host
    tensors untouched."""
    import copy

    from parallel_backend.engine.oracle import sample_call
    from parallel_backend.runtime.worker_loop import _materialize
    from parallel_backend.strategies.asyncdiff import STRATEGY
    from parallel_backend.strategies.asyncdiff.messages import PlaceStages, ProfileLayers, StagePlan
    from parallel_backend.strategies.asyncdiff.runner import StageRunner

    model = models["sd15-narrow"]
    meta = torch.device("meta")

    def runner_of():  # a worker's model as a stage cut loads it (a meta device's weights cannot be parked again)
        module = _materialize(copy.deepcopy(model.module), meta,
                              lambda m: STRATEGY.cut_on_load(None, m, model.family, ("asyncdiff", (0,), 0)))
        return StageRunner(module, model.family, meta)

    measured = runner_of().profile(ProfileLayers("fp", sample_call(model, 1, (model.default_resolution,) * 2)))
    cut = len(measured["names"]) // 2
    plan = StagePlan(0, 2, (cut,), None, 1, 1, 1, False, tuple(tuple(c) for c in measured["crossing"]))
    streamed = (cut - 3, cut - 2, cut - 1, cut + 1)  # the last of stage 1's: not this stage's, ignored
    sizes = [measured["layer_bytes"][i] for i in streamed[:3]]
    whole = runner_of()
    whole.setup(PlaceStages("fp", plan))
    runner = runner_of()
    reply = runner.setup(PlaceStages("fp", plan, streamed=streamed))
    assert reply["streamed"] == [measured["names"][i] for i in streamed[:3]]
    assert reply["streamed_bytes"] == sum(sizes) > 0
    kept = runner.held_bytes()
    assert kept == whole.held_bytes() - sum(sizes)
    parked = dict(runner.placement.parked)

    def run(stage_runner, fail: bool = False) -> list[int]:
        seen = []
        with stage_runner.streamed.call() as stream:
            for layer in stage_runner.mine:
                stream.before(layer)
                seen.append(stage_runner.held_bytes() + sum(stream.sizes[i] for i in stream.arriving))
                if fail and layer is stage_runner.streamed_layers[0]:
                    raise RuntimeError("a layer failed")
                stream.after(layer)
        return seen

    seen = run(runner)  # no cap: the next copy arrives while one runs
    assert max(seen) == kept + max(a + b for a, b in zip(sizes, sizes[1:]))
    assert runner.held_bytes() == kept and runner.placement.parked == parked
    capped = runner_of()
    capped.setup(PlaceStages("fp", plan, streamed=streamed, cap=kept + max(sizes)))  # room for one at a time
    assert max(run(capped)) == kept + max(sizes)
    with pytest.raises(RuntimeError, match="a layer failed"):
        run(runner, fail=True)
    assert runner.held_bytes() == kept and not runner.streamed.arriving and not runner.streamed.mounted


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m", "heun"])
def test_warm_up_counts_sampler_steps_on_the_digits_pipeline(cpu_pool, digits_pipeline, scheduler):
    request = GenerationRequest("a handwritten 3", steps=5, cfg=4.0, seed=5, scheduler=scheduler)
    reference = digits_pipeline.generate(request, progress=False)
    with digits_pipeline.parallel(ParallelConfig("cpu:2", "asyncdiff", warmup=5), pool=cpu_pool) as parallel:
        exact = parallel.generate(request, progress=False)
    torch.testing.assert_close(exact.latents, reference.latents, atol=ATOL, rtol=ATOL)
    with digits_pipeline.parallel(ParallelConfig("cpu:2", "asyncdiff", warmup=4), pool=cpu_pool) as parallel:
        stale = parallel.generate(request, progress=False)
    # heun calls twice per step: warm-up of 4 steps is 7 exact calls of its 9, so the result still differs
    assert (stale.latents - reference.latents).abs().max() > 1e-3


def test_one_stage_equals_one_device(models):
    model, job = models["tiny"], job_for("asyncdiff")
    resolution = (model.default_resolution,) * 2
    reference = run_loop(model, job, resolution, steps=STEPS, repeats=0).latents
    with WorkerPool("cpu:1") as pool:
        executor = ParallelExecutor(pool, ParallelConfig("cpu:1", "asyncdiff", warmup=0))
        result = run_loop(model, job, resolution, steps=STEPS, repeats=0, executor=executor).latents
    torch.testing.assert_close(result, reference, atol=ATOL, rtol=ATOL)


def _stream_loop(executor, model, streams, steps=STEPS):
    """Denoises each stream (its own noise and context) with calls interleaved across streams, one branch
    per call, as a host that evaluates cond and uncond separately does. Returns latents per stream."""
    from parallel_backend.models.sampling import make_scheduler
    from parallel_backend.tiny.model import SCHEDULER_CONFIG

    executor.new_job()
    schedulers = {s: make_scheduler("ddim", SCHEDULER_CONFIG) for s in streams}
    latents = {}
    for s in streams:
        schedulers[s].set_timesteps(steps)
        latents[s] = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(s)) * schedulers[s].init_noise_sigma
    contexts = {s: torch.randn(1, *model.context_shape, generator=torch.Generator().manual_seed(100 + s)) for s in streams}
    for step in range(steps):
        for s in streams:
            t = schedulers[s].timesteps[step]
            call = ModelCall(latents[s], t, contexts[s], stream=("stream", s), step=step)
            eps = executor(model.unet, FAMILY, call)
            latents[s] = schedulers[s].step(eps, t, latents[s]).prev_sample
    return latents


def test_streams_keep_their_own_stale_state(cpu_pool, models):
    model = models["tiny"]
    executor = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "asyncdiff", warmup=1))
    alone = _stream_loop(executor, model, [0])[0]
    interleaved = _stream_loop(executor, model, [0, 1])
    torch.testing.assert_close(interleaved[0], alone, atol=ATOL, rtol=ATOL)  # stream 1 never fed stream 0
    assert (interleaved[1] - alone).abs().max() > 1e-2


def test_a_new_job_starts_from_fresh_state_even_after_an_abandoned_one(cpu_pool, models):
    model = models["tiny"]
    job, resolution = job_for("asyncdiff"), (model.default_resolution,) * 2
    executor = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "asyncdiff", warmup=1))
    first = run_loop(model, job, resolution, steps=STEPS, repeats=0, executor=executor).latents
    _stream_loop(executor, model, [0], steps=3)  # a job given up half-way (as an interrupt leaves it)
    again = run_loop(model, job, resolution, steps=STEPS, repeats=0, executor=executor).latents
    torch.testing.assert_close(again, first, atol=0, rtol=0)


def test_a_failing_stage_fails_fast_and_names_its_device(models):
    model = models["tiny"]
    with WorkerPool("cpu:2", pg_timeout_s=60) as pool:
        executor = ParallelExecutor(pool, ParallelConfig("cpu:2", "asyncdiff", warmup=1))
        x = torch.randn(2, 4, 8, 8)
        context = torch.randn(2, *model.context_shape)
        executor(model.unet, FAMILY, ModelCall(x, torch.tensor(900), context, branches=2))
        bad = ModelCall(x, torch.tensor(800), context, {"mid_block_additional_residual": x}, branches=2, index=1)
        started = time.monotonic()
        with pytest.raises(WorkerError, match=r"cpu \(worker \d\), call 1 \(step 1\): ValueError: asyncdiff cannot"):
            executor(model.unet, FAMILY, bad)
        assert time.monotonic() - started < 20  # not the process group's 60 s timeout
        ok = executor(model.unet, FAMILY, ModelCall(x, torch.tensor(900), context, branches=2))
        assert ok.shape == x.shape  # the pool restarted


def test_digits_stay_readable_with_two_stages(cpu_pool, digits_pipeline):
    """Quality floor: PSNR vs one device and the classifier's accuracy, for a few warm-up settings."""
    digits = list(range(10))

    def generate_all():
        pixels, latents = [], []
        for digit in digits:
            out = digits_pipeline.generate(GenerationRequest(prompt_for(digit), steps=25, cfg=4.0, seed=digit,
                                                             num_images=3), progress=False)
            pixels.append(out.extras["pixels"])
            latents.append(out.latents)
        return torch.cat(pixels), torch.cat(latents)

    labels = torch.tensor([d for d in digits for _ in range(3)])
    reference_pixels, reference_latents = generate_all()
    reference_accuracy = digit_accuracy(reference_pixels, labels)
    report = {}
    for warmup in (1, 3, 5):
        with digits_pipeline.parallel(ParallelConfig("cpu:2", "asyncdiff", warmup=warmup), pool=cpu_pool):
            pixels, latents = generate_all()
        report[warmup] = (psnr(reference_latents, latents), digit_accuracy(pixels, labels))
    print(f"one device: accuracy {reference_accuracy:.2f}; asyncdiff warm-up -> (latent PSNR dB, accuracy): {report}")
    for warmup, (db, accuracy) in report.items():
        assert accuracy >= reference_accuracy - 0.05, report
        assert db > 20, report
    assert report[5][0] >= report[1][0], report  # more exact steps, closer to one device


def test_time_shift_and_stride_act_only_after_warm_up(cpu_pool, models):
    model = models["tiny"]
    job, resolution = job_for("asyncdiff"), (model.default_resolution,) * 2
    reference = run_loop(model, job, resolution, steps=STEPS, repeats=0).latents
    results = {}
    for knobs in ({}, {"time_shift": True}, {"stride": 2}):
        for warmup in (STEPS, 1):
            executor = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "asyncdiff", warmup=warmup, **knobs))
            results[tuple(knobs), warmup] = run_loop(model, job, resolution, STEPS, 0, executor).latents
    quality = {knobs: psnr(reference, results[knobs, 1]) for knobs in ((), ("time_shift",), ("stride",))}
    for knobs in quality:
        torch.testing.assert_close(results[knobs, STEPS], reference, atol=ATOL, rtol=ATOL)
        assert quality[knobs] > 10, quality  # 6 coarse steps on random inputs: far from the digits' 37 dB
    assert (results[("time_shift",), 1] - results[(), 1]).abs().max() > 1e-4
    assert (results[("stride",), 1] - results[(), 1]).abs().max() > 1e-4


def test_parallelized_diffusers_pipeline_with_asyncdiff(cpu_pool, tiny_sd_folder):
    import diffusers

    from parallel_backend.hosts.diffusers import parallelize, unparallelize

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_sd_folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe("a red cube", num_inference_steps=4, guidance_scale=5.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    reference = run()
    parallelize(pipe, ParallelConfig("cpu:2", "asyncdiff", warmup=4), pool=cpu_pool)
    try:
        exact, again = run(), run()  # the second run is a new job: the timestep rose again
    finally:
        unparallelize(pipe)
    torch.testing.assert_close(exact, reference, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(again, reference, atol=ATOL, rtol=ATOL)


def test_cli_explains_and_generates_with_asyncdiff(tmp_path, capsys):
    from parallel_backend.commands.cli import main

    assert main(["generate", "--devices", "cpu:2", "--strategy", "asyncdiff", "--warmup", "2", "--steps", "4",
                 "--explain"]) == 0
    grid = capsys.readouterr().out
    assert "cpu (stage 0)" in grid and "latent of c1 (exact)" in grid and "latent of c2\n" in grid
    out = tmp_path / "digit.png"
    assert main(["generate", "--devices", "cpu:2", "--strategy", "asyncdiff", "--steps", "6", "--quiet",
                 "--out", str(out)]) == 0
    assert out.stat().st_size > 0 and "asyncdiff on 2 devices" in capsys.readouterr().out


def test_a_stream_that_appears_after_warm_up_is_refused_with_the_schedule(cpu_pool, models):
    model = models["tiny"]
    executor = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "asyncdiff", warmup=1))
    executor.new_job()
    call = ModelCall(torch.randn(1, 4, 8, 8), torch.tensor(500), torch.randn(1, *model.context_shape),
                     stream=("late",), step=3)
    with pytest.raises(WorkerError, match=r"(?s)holds no input for stream.*step 3.*prediction from.*latent of c0"):
        executor(model.unet, FAMILY, call)


def test_three_stages_hand_over_every_skip(models):
    """A middle stage receives skips it never touches and passes them on before computing (tagged sends)."""
    model = models["sd15-narrow"]
    job, resolution = job_for("asyncdiff"), (model.default_resolution,) * 2
    reference = run_loop(model, job, resolution, steps=4, repeats=0).latents
    with WorkerPool("cpu:3") as pool:
        executor = ParallelExecutor(pool, ParallelConfig("cpu:3", "asyncdiff", warmup=4))
        result = run_loop(model, job, resolution, steps=4, repeats=0, executor=executor).latents
        assert len(stage_plan(executor)["stages"]) == 3
    torch.testing.assert_close(result, reference, atol=ATOL, rtol=ATOL)


@pytest.fixture(scope="module")
def four_workers():
    """One pool of four CPU workers for both meshes below: starting four workers and loading the model into each
    is most of such a test's time, and each job starts afresh on a pool (test_a_new_job_starts_from_fresh_state).
    Last in this module, so that these workers end with the two tests that use them."""
    with WorkerPool("cpu:4") as pool:
        yield pool


@pytest.mark.parametrize("job, mesh", [(Job(1, 7.5), {"cfg_degree": 2}), (Job(2, 1.0), {"batch_degree": 2})])
def test_rows_times_stages_on_four_devices(models, four_workers, job, mesh):
    model, pool = models["sd15-narrow"], four_workers
    resolution = (model.default_resolution,) * 2
    reference = run_loop(model, job, resolution, steps=STEPS, repeats=0).latents
    calls = pool.stats.calls
    exact = ParallelExecutor(pool, ParallelConfig("cpu:4", "asyncdiff", warmup=STEPS, **mesh))
    torch.testing.assert_close(run_loop(model, job, resolution, steps=STEPS, repeats=0, executor=exact).latents,
                               reference, atol=ATOL, rtol=ATOL)
    assert pool.stats.calls == calls + STEPS and len(pool.devices) == 4  # the pool ran every call
    assert len(stage_plan(exact)["stages"]) == 2
    stale = ParallelExecutor(pool, ParallelConfig("cpu:4", "asyncdiff", warmup=2, **mesh))
    result = run_loop(model, job, resolution, steps=STEPS, repeats=0, executor=stale).latents
    assert 0 < (result - reference).abs().max() and psnr(reference, result) > 20
