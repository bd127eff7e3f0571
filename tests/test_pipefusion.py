"""pipefusion: the patch cut (pure), then on pools of CPU workers: a warm-up covering every step equals one device
(Flux and Wan) with each worker running its stage and holding only its blocks' weights; after warm-up the result
stays within the PSNR floor; cfg 2 x pipefusion 2 on four workers; a job never sees another's keys and values;
a worker lost in the middle of the pipeline fails the job in time, naming it, and the next job runs."""

from __future__ import annotations

import re
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from parallel_backend import strategies
from parallel_backend.engine.config import ParallelConfig
from parallel_backend.engine.oracle import Job, job_for, psnr, run_loop
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.models import dit_stages
from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.models.stages import weights_of
from parallel_backend.runtime.pool import WorkerError, WorkerPool
from parallel_backend.runtime.recipe import weights_bytes
from parallel_backend.strategies.asyncdiff.schedule import balance, stage_costs
from parallel_backend.strategies.pipefusion import FAMILIES
from parallel_backend.strategies.pipefusion.cut import (SLACK, cost_of_cap, default_cap, held_per_stage, stage_bytes,
                                                       weights_cut)
from parallel_backend.strategies.pipefusion.patches import Patches

FAULT = str(Path(__file__).with_name("reliability") / "exchange_fault.py")
STEPS = 4
RESOLUTION = {"flux-small": (128, 128), "wan-small": (64, 64)}  # 64 image + 256 text tokens; 5 x 16 video tokens


def _relative(result, reference) -> float:
    return float((result - reference).abs().max() / reference.abs().max())


# ---- the patches, without processes -------------------------------------------------------------------------

def test_text_goes_with_patch_zero_and_patches_hold_about_equal_tokens():
    cut = Patches({"image": 1024, "text": 256}, 4)
    assert [cut.tokens(m) for m in range(4)] == [320, 320, 320, 320]
    assert cut.ranges(0) == {"image": range(0, 64), "text": range(0, 256)}
    assert cut.ranges(3)["text"] == range(0, 0)
    # in the attention's joint [text, image] order: patch 0 is its first 320 rows, the others follow in order
    joint = [p for m in range(4) for p in cut.positions(m, ("text", "image"))]
    assert joint == list(range(1280))
    assert cut.positions(1, ("image",)) == list(range(64, 384))
    assert Patches({"video": 10}, 3).main_sizes() == [4, 3, 3]
    long_text = Patches({"image": 8, "text": 100}, 4)  # the text alone outweighs a share: patch 0 keeps 1 image token
    assert long_text.main_sizes()[0] == 1 and sum(long_text.main_sizes()) == 8


def test_text_longer_than_a_share_runs_over_into_the_next_patches():
    """flux-small at 512 px in 8 patches: 256 text tokens of 1280 outweigh a share (160); given all to patch 0 it
    would hold 257 tokens and the pipeline's fill 20% of stage 0's call. The text fills patches 0 and 1 instead,
    every patch holds 160 tokens (each at least one image token), and the patches cover the joint sequence once."""
    cut = Patches({"image": 1024, "text": 256}, 8)
    assert [cut.tokens(m) for m in range(8)] == [160] * 8
    assert cut.text_sizes() == [159, 97, 0, 0, 0, 0, 0, 0] and cut.main_sizes()[:2] == [1, 63]
    assert cut.ranges(1) == {"image": range(1, 64), "text": range(159, 256)}
    joint = [p for m in range(8) for p in cut.positions(m, ("text", "image"))]
    assert sorted(joint) == list(range(1280)) and cut.positions(0, ("text", "image")) == [*range(159), 256]


def test_the_bench_says_where_each_stage_waited_and_the_time_outside_the_stages():
    """Medians per stage and part over the patched calls (the runners' `waits`), and each call's time less its
    slowest runner's."""
    from parallel_backend.strategies.pipefusion import wait_parts

    def call(fill, seconds):
        parts = {"fill": fill, "later": 0.004, "modulation": 0.0, "sends": 0.0}
        return {"extra": {0: {"waits": dict.fromkeys(parts, 0.0), "seconds": 0.5, "first_patch_tokens": (160, 1280)},
                          1: {"waits": parts, "seconds": seconds, "first_patch_tokens": (160, 1280)}}}

    parts = wait_parts([call(0.09, 0.6), call(0.07, 0.55), call(0.11, 0.7)], [0.62, 0.56, 0.75])
    assert parts["stages"][1]["fill"] == pytest.approx(0.09) and parts["outside"] == pytest.approx(0.02)
    assert parts["summary"] == ("ms per part, worker 0: none; worker 1: fill 90.0, later 4.0; the first patch holds "
                                "160 of 1280 tokens; 20.0 ms per call outside the stages")


def test_more_patches_than_tokens_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match=r"cannot cut 3 image tokens into 4 patches.*--patches"):
        Patches({"image": 3, "text": 5}, 4)


def test_the_strategy_names_the_families_dit_stages_describes():
    from parallel_backend.models import comfy_dit_stages

    assert set(FAMILIES) == set(dit_stages.FAMILIES) | set(comfy_dit_stages.FAMILIES)
    pipefusion = strategies.get("pipefusion")
    pipefusion.check_family("diffusers_dit:flux")
    pipefusion.check_family("comfy_dit:flux")
    pipefusion.check_family("comfy_dit:wan")
    for family in ("comfy_dit:qwen_image", "diffusers_dit:qwen_image", "comfy_dit:chroma", "comfy_dit:hunyuan_video",
                   "comfy_dit:sd3", "comfy_dit:ltxv", "comfy_dit:lumina"):
        pipefusion.check_family(family)
    for family in ("diffusers_unet", "comfy_unet"):
        with pytest.raises(ValueError, match=re.escape(f"'pipefusion' {pipefusion.scope}, and this model is {family!r}")):
            pipefusion.check_family(family)


def _brute_force(seconds, sizes, held, cap):
    """The least slowest stage of every two-stage cut whose stages hold at most `cap`, and the cuts reaching it."""
    fits = {c: max(sum(seconds[:c]), sum(seconds[c:])) for c in range(1, len(seconds))
            if held[0] + sum(sizes[:c]) <= cap and held[1] + sum(sizes[c:]) <= cap}
    best = min(fits.values())
    return best, [c for c, slowest in fits.items() if slowest == best]


def test_the_cut_keeps_each_stage_under_the_cap_where_time_alone_would_not():
    """Flux's shape: two double-stream blocks of twice a single block's weights, six blocks of equal time. The
    time-balanced cut (3 / 3) puts 66% of the weights on stage 0; the default cap (an even share plus SLACK)
    moves the cut to the fastest one within it, and a memory per device given replaces the default."""
    seconds, sizes = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [36, 36, 15, 15, 15, 15]
    held = held_per_stage(2, 1, 3, 2)
    whole = sum(sizes) + 2 + 1 + 3
    assert balance(seconds, 2) == [3] and max(stage_bytes(sizes, held, [3])) > default_cap(whole, 2)
    cut = weights_cut(seconds, sizes, held, whole, 2)
    cuts, cap = cut.cuts, cut.cap
    assert cap == int(whole * (0.5 + SLACK)) and max(stage_bytes(sizes, held, cuts)) <= cap
    assert cut.holders == [0, 0, 1, 1, 1, 1] and cut.loads == stage_bytes(sizes, held, cuts) and cut.lent() == []
    assert cuts[0] in _brute_force(seconds, sizes, held, cap)[1] and cuts == [2]
    mib = [s * 2**20 for s in sizes]
    assert cost_of_cap(seconds, mib, held, [2]) == ("cuts the blocks 2 / 4 where time alone would cut 3 / 3 (87 MiB "
                                                    "on one device), its slowest stage 33% slower")
    assert cost_of_cap(seconds, mib, held, [3]) == ""
    assert (weights_cut(seconds, sizes, held, whole, 2, memory_bytes=10 * whole).cuts,
            weights_cut(seconds, sizes, held, whole, 2, memory_bytes=10 * whole).cap) == ([3], 10 * whole)
    assert weights_cut(seconds, sizes, held, whole, 2, memory_bytes=100).cuts == [3]  # 91 fits a cap of 100
    with pytest.raises(ValueError, match=r"cannot cut this model's 6 blocks into 2 stages within .* the lightest "
                                         r"cut holds .*raise --memory-per-device or add devices"):
        weights_cut(seconds, sizes, held, whole, 2, memory_bytes=70)


def test_the_capped_cut_is_the_fastest_within_the_cap_on_random_profiles():
    """Against brute force over every two- and three-stage cut; where the default share fits no cut (a block
    heavier than it), the cap rises to the lightest cut's heaviest stage instead of failing."""
    import itertools
    import random

    rng = random.Random(3)
    for _ in range(200):
        n, stages = rng.randint(3, 9), rng.choice([2, 3])
        seconds = [rng.uniform(0.1, 2.0) for _ in range(n)]
        sizes = [rng.randint(1, 40) for _ in range(n)]
        shared, first, last = (rng.randint(0, 5) for _ in range(3))
        held = held_per_stage(shared, first, last, stages)
        whole = sum(sizes) + shared + first + last
        cut = weights_cut(seconds, sizes, held, whole, stages)
        cuts, cap = cut.cuts, cut.cap
        options = {}
        for c in itertools.combinations(range(1, n), stages - 1):
            weights = stage_bytes(sizes, held, list(c))
            options[c] = (max(weights), max(stage_costs(seconds, list(c))))
        lightest = min(w for w, _ in options.values())
        assert cap == max(default_cap(whole, stages), lightest)
        fastest = min(t for w, t in options.values() if w <= cap)
        assert options[tuple(cuts)][0] <= cap and options[tuple(cuts)][1] == pytest.approx(fastest)


def test_modulation_moves_to_the_lighter_stage_so_the_time_cut_fits_the_cap():
    """Flux's shape again, each block's modulation (a double block's 12 of its 36, a single block's 3 of 15)
    movable: the cut stays the one balanced on time (3 / 3); both double blocks' modulation goes to stage 1, and
    then the last single block's comes back to stage 0, which evens the weights out as far as they go (90 / 50,
    78 / 62, 66 / 74, 69 / 71)."""
    seconds, sizes, movable = [1.0] * 6, [36, 36, 15, 15, 15, 15], [12, 12, 3, 3, 3, 3]
    held = held_per_stage(2, 1, 3, 2)
    whole = sum(sizes) + 2 + 1 + 3
    cut = weights_cut(seconds, sizes, held, whole, 2, movable=movable)
    assert cut.cuts == [3] and cut.cap == default_cap(whole, 2)
    assert cut.holders == [1, 1, 0, 1, 1, 0] and cut.lent() == [(0, 0, 1), (1, 0, 1), (5, 1, 0)]
    assert cut.loads == [2 + 1 + 87 - 24 + 3, 2 + 3 + 45 + 24 - 3] and max(cut.loads) <= cut.cap
    assert cost_of_cap(seconds, sizes, held, cut.cuts, movable=movable) == ""
    # a memory per device below an even share is refused before any work, naming the lightest possible
    with pytest.raises(ValueError, match=r"within .* GiB of weights per device: the lightest cut holds"):
        weights_cut(seconds, sizes, held, whole, 2, memory_bytes=60, movable=movable)


def test_the_spread_cut_is_the_fastest_whose_fixed_weights_fit_and_keeps_every_stage_within_the_cap():
    """Random profiles against brute force: the cut is the fastest of those whose stages' weights, less their
    blocks' movable ones, fit the cap (where the spread reaches the cap, as it does here in all but coarse
    cases); the loads are the holders' sums; no stage exceeds the cap; only movable weights move; and no block's
    movable weights on the heaviest stage would lower it by moving to the lightest."""
    import itertools
    import random

    rng, checked = random.Random(5), 0
    for _ in range(200):
        n, stages = rng.randint(3, 9), rng.choice([2, 3])
        seconds = [rng.uniform(0.1, 2.0) for _ in range(n)]
        sizes = [rng.randint(1, 40) for _ in range(n)]
        movable = [rng.randint(0, size // 2) for size in sizes]
        shared, first, last = (rng.randint(0, 5) for _ in range(3))
        held, whole = held_per_stage(shared, first, last, stages), sum(sizes) + shared + first + last
        cut = weights_cut(seconds, sizes, held, whole, stages, movable=movable)
        owners = [k for k, (a, b) in enumerate(zip([0, *cut.cuts], [*cut.cuts, n])) for _ in range(a, b)]
        loads = [held[k] + sum(sizes[i] - (movable[i] if cut.holders[i] != k else 0) for i in range(n) if owners[i] == k)
                 + sum(movable[i] for i in range(n) if cut.holders[i] == k != owners[i]) for k in range(stages)]
        assert cut.loads == loads and max(loads) <= cut.cap
        assert all(h == owners[i] or movable[i] for i, h in enumerate(cut.holders))
        heavy, light = loads.index(max(loads)), loads.index(min(loads))
        assert not [i for i, h in enumerate(cut.holders) if h == heavy and 0 < movable[i] < loads[heavy] - loads[light]]
        fixed = [s - m for s, m in zip(sizes, movable)]
        fits = [max(stage_costs(seconds, list(c))) for c in itertools.combinations(range(1, n), stages - 1)
                if max(stage_bytes(fixed, held, list(c))) <= cut.cap]
        if cut.cap == default_cap(whole, stages):
            checked += 1
            assert max(stage_costs(seconds, cut.cuts)) == pytest.approx(min(fits))
    assert checked > 150


# ---- on a pool ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models():
    return {name: build_bench_model(name) for name in RESOLUTION}


def _run(model, executor=None, warmup_job=None, steps=STEPS):
    job = warmup_job or job_for("pipefusion")
    return run_loop(model, job, RESOLUTION[model_name(model)], steps=steps, repeats=0, executor=executor).latents


def model_name(model) -> str:
    return "flux-small" if model.family.endswith("flux") else "wan-small"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESOLUTION))
def test_warm_up_covering_every_step_equals_one_device(cpu_pool, models, name):
    model = models[name]
    reference = _run(model)
    executor = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "pipefusion", warmup=STEPS, patches=4))
    result = _run(model, executor)
    assert _relative(result, reference) < 1e-4
    plan = strategies.get("pipefusion").stage_plan(executor.engine)
    assert [s["count"] > 0 for s in plan["stages"]] == [True, True]  # each worker ran blocks of its own
    assert sorted(cpu_pool.peak_memory) == [0, 1] and min(cpu_pool.peak_memory.values()) > 0
    held, whole = cpu_pool.weights_bytes[plan["fingerprint"]], weights_bytes(model.module)
    assert sorted(held) == [0, 1] and [held[0], held[1]] == plan["stage_weights"]  # as measured on the workers
    assert plan["whole_weights"] == whole and max(held.values()) <= default_cap(whole, 2)


@pytest.mark.slow
def test_modulation_on_the_other_stage_keeps_the_time_cut_within_the_cap(cpu_pool, models):
    """flux-small: the cut balanced on time would hold over the default cap on stage 0 (its double-stream
    blocks); with both double blocks' modulation held and computed by stage 1 the cut is the time-balanced one
    all the same and every stage holds at most the cap (as measured on the workers), exactly (warm-up covering
    every step). With a memory per device too small for any spread, the job is refused before any work."""
    model = models["flux-small"]
    reference, whole = _run(model), weights_bytes(model.module)
    pipefusion = strategies.get("pipefusion")
    executor = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "pipefusion", warmup=STEPS, patches=4))
    assert _relative(_run(model, executor), reference) < 1e-4
    plan = pipefusion.stage_plan(executor.engine)
    held = cpu_pool.weights_bytes[plan["fingerprint"]]
    assert plan["cuts"] == balance(plan["layer_seconds"], 2) and plan["weights_cap"] == default_cap(whole, 2)
    assert {(block, owner, holder) for block, owner, holder in plan["lent"] if block < 2} == {(0, 0, 1), (1, 0, 1)}
    assert [held[0], held[1]] == plan["stage_weights"] and max(held.values()) <= default_cap(whole, 2)
    assert held[0] + sum(plan["lent_bytes"][:2]) > default_cap(whole, 2)  # kept on stage 0, they would not fit
    tight = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "pipefusion", warmup=STEPS, patches=4,
                                                      memory_per_device=0.4 * whole / 2**30))
    with pytest.raises(ValueError, match="pipefusion cannot cut this model's 6 blocks into 2 stages within"):
        _run(model, tight)


def _sibling(name: str):
    """The test module `name` beside this one, whose tiny seeded transformers, calls or pipelines these tests share."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _sequence_dit():
    return _sibling("test_sequence_dit")


def _tiny(name: str):
    """(model, its family, a call) of test_sequence_dit's tiny transformers: odd token counts, SD3.5's dual
    attention, Flux's and Qwen-Image's text first and SD3's image first in their joint attentions."""
    from parallel_backend.models.diffusers_dit import family_named

    tiny = _sequence_dit()
    model, call = {"flux": lambda: (tiny.tiny_flux(), tiny.flux_call(1, 5, 4, 6)),
                   "wan": lambda: (tiny.tiny_wan(), tiny.wan_call(1, 3, 8, 8)),
                   "sd3.5": lambda: (tiny.tiny_sd3((0,)), tiny.sd3_call(1, 7, 8, 8)),
                   "qwen_image": lambda: (tiny.tiny_qwen_image(), tiny.qwen_image_call(2, 5, [(3, 5)]))}[name]()
    family = dit_stages.FAMILIES[f"diffusers_dit:{name.split('.')[0]}"].name
    return model, family, replace(call, shared=family_named(family).shared)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux", "wan", "sd3.5", "qwen_image"])
def test_a_patched_call_on_unchanged_inputs_equals_one_device(cpu_pool, name):
    """When the inputs do not change, the keys and values the call before left are this call's own: a patched
    call must then equal one device, which checks every patch's tokens, positions, rotary rows and text."""
    from parallel_backend.models.diffusers_dit import forward

    model, family, call = _tiny(name)
    reference = forward(model, call)
    executor = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "pipefusion", warmup=1, patches=3))
    executor.new_job()
    for step in range(3):
        result = executor.run(model, family, replace(call, step=step))
        assert [extra["patches"] for _, extra in sorted(result.extra.items())] == [1 if step == 0 else 3] * 2
        assert _relative(result.out, reference) < 1e-4, step


def _qwen_image_loop(model, call, steps: int, executor=None):
    """Flow-matching Euler from pure noise to 0 in `steps` calls (the timestep is the noise level, as
    QwenImagePipeline hands it over), on one device or through `executor`, as one job; the final latents."""
    from parallel_backend.models.diffusers_dit import forward

    x, sigmas = call.x, torch.linspace(1.0, 0.0, steps + 1)
    with executor.job() if executor is not None else nullcontext():
        for step, (sigma, after) in enumerate(zip(sigmas, sigmas[1:])):
            now = replace(call, x=x, t=sigma.expand(call.rows), step=step)
            velocity = (forward(model, now) if executor is None
                        else executor.run(model, "diffusers_dit:qwen_image", now).out)
            x = x + (after - sigma) * velocity
    return x


@pytest.mark.slow
def test_qwen_image_warm_up_equals_one_device_each_stage_its_blocks_and_after_it_the_psnr_floor(cpu_pool):
    """diffusers' Qwen-Image (two rows, 5 text tokens, 8 x 8 image tokens) in the sampler loop: warm-up covering every
    step equals one device, each worker holding only its stage's block (and the embedders every stage runs); after
    one exact step, patches on stale keys and values stay within the PSNR floor."""
    tiny = _sequence_dit()
    model, call = tiny.tiny_qwen_image(), tiny.qwen_image_call(2, 5, [(8, 8)])
    reference = _qwen_image_loop(model, call, 8)
    exact = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "pipefusion", warmup=8, patches=4))
    assert _relative(_qwen_image_loop(model, call, 8, exact), reference) < 1e-4
    plan = strategies.get("pipefusion").stage_plan(exact.engine)
    held = cpu_pool.weights_bytes[plan["fingerprint"]]
    family = dit_stages.FAMILIES["diffusers_dit:qwen_image"]
    blocks = [weights_of([block]) for block in model.transformer_blocks]
    shared, last = weights_of(family.shared(model)), weights_of(family.last(model))
    assert [held[0], held[1]] == [shared + blocks[0], shared + blocks[1] + last]
    assert max(held.values()) < weights_bytes(model)
    stale = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "pipefusion", warmup=1, patches=4))
    result = _qwen_image_loop(model, call, 8, stale)
    assert (result - reference).abs().max() > 1e-4 * reference.abs().max()  # stale keys and values were used
    assert psnr(reference, result) >= 30, psnr(reference, result)


@pytest.mark.slow
def test_a_qwen_image_pipeline_through_parallelize_equals_plain_with_warm_up_covering_every_step(cpu_pool,
                                                                                                  monkeypatch):
    """QwenImagePipeline with true CFG (the branches joined into one call from the second step), its transformer
    of two blocks cut into two stages by parallelize: every call went through pipefusion's stages."""
    from diffusers import QwenImageTransformer2DModel

    from parallel_backend.hosts.diffusers import parallelize, unparallelize

    pipelines, meshes, run = _sibling("test_diffusers_transformers"), [], ParallelExecutor.run

    def run_recording_the_mesh(self, *args, **kwargs):
        result = run(self, *args, **kwargs)
        meshes.append((result.mesh.strategy, result.mesh.inner, result.bytes_sent > 0))
        return result

    monkeypatch.setattr(ParallelExecutor, "run", run_recording_the_mesh)
    case = pipelines.qwen_image()
    torch.manual_seed(0)
    case.pipe.transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4)).eval().requires_grad_(False)
    case.pipe.set_progress_bar_config(disable=True)
    reference = pipelines._generate(case, "cfg")
    parallelize(case.pipe, ParallelConfig("cpu:2", "pipefusion", warmup=pipelines.STEPS, patches=2), pool=cpu_pool)
    try:
        result = pipelines._generate(case, "cfg")
    finally:
        unparallelize(case.pipe)
    pipelines._assert_matches(result, reference)
    assert meshes and set(meshes) == {("pipefusion", 2, True)}  # every call ran in stages, tokens crossed


@pytest.mark.parametrize("change, refused", [
    ({"encoder_hidden_states_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}, "a text padding mask"),
    ({"controlnet_block_samples": [torch.zeros(2, 15, 48)]}, "ControlNet residuals"),
    ({"attention_kwargs": {"scale": 0.5}}, r"attention_kwargs \(LoRA scale\)"),
    ("zero_cond_t", "zero_cond_t"),
])
def test_qwen_image_inputs_a_patched_call_cannot_take_are_refused_by_name_before_any_block(change, refused):
    from parallel_backend.strategies.asyncdiff.messages import StagePlan
    from parallel_backend.strategies.pipefusion.messages import PipeCall, PlaceBlocks
    from parallel_backend.strategies.pipefusion.runner import PipeRunner

    tiny = _sequence_dit()
    model = tiny.tiny_qwen_image(zero_cond_t=change == "zero_cond_t")
    call = tiny.qwen_image_call(2, 5, [(3, 5)])
    call = replace(call, extras={**call.extras, **(change if isinstance(change, dict) else {})}, job=1, stream=("s",))
    ran = []
    for block in model.transformer_blocks:
        block.register_forward_pre_hook(lambda *_: ran.append(1))
    runner = PipeRunner(model, "diffusers_dit:qwen_image", torch.device("cpu"))
    runner.setup(PlaceBlocks("tiny", StagePlan(0, 1, (), None, None, 0, 1, False, ())))
    with pytest.raises(ValueError, match=f"pipefusion does not run Qwen-Image with {refused}.*use cfg, batch or "
                                         "ulysses"):
        runner.call(PipeCall("tiny", call, 3))
    assert not ran


def test_an_all_true_text_mask_is_no_mask():
    """QwenImagePipeline drops a mask with no padding; one handed over anyway masks nothing: the patched call runs
    (without it) and equals the model's own forward."""
    from parallel_backend.models.diffusers_dit import forward
    from parallel_backend.strategies.asyncdiff.messages import StagePlan
    from parallel_backend.strategies.pipefusion.messages import PipeCall, PlaceBlocks
    from parallel_backend.strategies.pipefusion.runner import PipeRunner

    tiny = _sequence_dit()
    model, call = tiny.tiny_qwen_image(), tiny.qwen_image_call(2, 5, [(3, 5)])
    call = replace(call, extras={**call.extras, "encoder_hidden_states_mask": torch.ones(2, 5, dtype=torch.long)},
                   job=1, stream=("s",))
    runner = PipeRunner(model, "diffusers_dit:qwen_image", torch.device("cpu"))
    runner.setup(PlaceBlocks("tiny", StagePlan(0, 1, (), None, None, 0, 1, False, ())))
    reference = forward(model, call)
    for patches in (1, 3):
        torch.testing.assert_close(runner.call(PipeCall("tiny", call, patches)).out, reference, atol=1e-5, rtol=1e-5)


def test_a_patched_call_prepares_its_inputs_once_for_tokens_context_and_counts():
    """Qwen-Image's forward up to its first block (the embedders, the text's norm and projection, the rotary tables)
    is what its tokens, context and counts all read: a patched call runs it once, not once for each, and a call
    outside a runner still runs it every time it is asked."""
    from parallel_backend.models import dit_stages
    from parallel_backend.strategies.asyncdiff.messages import StagePlan
    from parallel_backend.strategies.pipefusion.messages import PipeCall, PlaceBlocks
    from parallel_backend.strategies.pipefusion.runner import PipeRunner

    tiny = _sequence_dit()
    model, call = tiny.tiny_qwen_image(), replace(tiny.qwen_image_call(2, 5, [(3, 5)]), job=1, stream=("s",))
    prepared = []
    model.txt_in.register_forward_pre_hook(lambda *_: prepared.append(1))
    runner = PipeRunner(model, "diffusers_dit:qwen_image", torch.device("cpu"))
    runner.setup(PlaceBlocks("tiny", StagePlan(0, 1, (), None, None, 0, 1, False, ())))
    for patches in (1, 3):
        prepared.clear()
        runner.call(PipeCall("tiny", call, patches))
        assert len(prepared) == 1, f"{patches} patches"
    prepared.clear()
    family = dit_stages.FAMILIES["diffusers_dit:qwen_image"]
    with torch.inference_mode():
        family.context(model, call), family.tokens(model, call)
    assert len(prepared) == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESOLUTION))
def test_after_warm_up_the_result_stays_within_the_psnr_floor(cpu_pool, models, name):
    model = models[name]
    steps = 8
    reference = _run(model, steps=steps)
    executor = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "pipefusion", warmup=1, patches=4))
    result = _run(model, executor, steps=steps)
    assert (result - reference).abs().max() > 0  # the patched steps ran on stale keys and values
    assert psnr(reference, result) >= 30, psnr(reference, result)


@pytest.mark.slow
def test_a_job_never_sees_the_keys_and_values_of_another(cpu_pool, models):
    """warm-up 0: only a job's first call of a stream runs whole; a second job must start from nothing again,
    even after a first one abandoned half-way."""
    model = models["flux-small"]
    executor = ParallelExecutor(cpu_pool, ParallelConfig("cpu:2", "pipefusion", warmup=0, patches=3))
    first = _run(model, executor)
    _run(model, executor, steps=2)  # a shorter job: its last keys and values differ from the first job's
    again = _run(model, executor)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    reference = _run(model)
    assert psnr(reference, first) >= 30


@pytest.mark.slow
def test_cfg_times_pipefusion_on_four_workers(models):
    model, job = models["flux-small"], Job(1, 7.5)
    reference = _run(model, warmup_job=job)
    with WorkerPool("cpu:4") as pool:
        exact = ParallelExecutor(pool, ParallelConfig("cpu:4", "pipefusion", cfg_degree=2, warmup=STEPS))
        torch.testing.assert_close(_run(model, exact, warmup_job=job), reference, atol=1e-4, rtol=1e-4)
        plan = strategies.get("pipefusion").stage_plan(exact.engine)
        assert len(plan["stages"]) == 2 and sorted(pool.weights_bytes[plan["fingerprint"]]) == [0, 1, 2, 3]
        stale = ParallelExecutor(pool, ParallelConfig("cpu:4", "pipefusion", cfg_degree=2, warmup=1))
        result = _run(model, stale, warmup_job=job)
    assert (result - reference).abs().max() > 0 and psnr(reference, result) >= 30


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1])
def test_a_worker_lost_mid_pipeline_is_named_and_the_next_job_runs(models, victim, tmp_path):
    """Each worker posts one exchange per patch (stage 0 its sends, stage 1 its receives): exchange 3 falls in
    the first patched call, warm-up 1, four patches."""
    model = models["flux-small"]
    pool = WorkerPool("cpu:2", hang_floor_s=5.0)
    executor = ParallelExecutor(pool, ParallelConfig("cpu:2", "pipefusion", warmup=1, patches=4))
    try:
        before = _run(model, executor, steps=3)
        pool.shutdown()
        fired = tmp_path / "fault_time"
        pool.worker_setup = (FAULT, "signal_at_exchange", f"{victim}:3:SIGKILL:{fired}")
        with pytest.raises(WorkerError) as caught:
            _run(model, executor, steps=3)
        noticed = time.time() - float(fired.read_text())
        assert caught.value.rank == victim and str(caught.value).startswith(f"cpu (worker {victim}), call ")
        assert noticed < 5.0, noticed
        pool.worker_setup = None
        calls = pool.stats.calls
        after = _run(model, executor, steps=3)
        assert pool.stats.calls > calls
        torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    finally:
        pool.shutdown()
