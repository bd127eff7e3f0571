"""ulysses, ring and usp on a pool of CPU workers: one diffusers transformer call split by its token sequence
equals the call on one device, alone and under cfg x sequence, and each rank's counters show the exchanges it
made; auto keeps the tiny model's call on one device (its plan); what they refuse, before any work."""

from __future__ import annotations

import logging

import pytest
import torch

from parallel_backend.runtime.calls import ModelCall
from parallel_backend.engine.config import ParallelConfig
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.models import diffusers_dit, forward_for_family
from parallel_backend.plan.calibrate import plan_auto_with
from parallel_backend.plan.links import Link
from parallel_backend.runtime.pool import WorkerPool

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4  # of the output's scale (TESTING.md); fp32 sums in another order only
ATTENTIONS = 2  # _tiny_flux: one double and one single block, one joint attention each


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=4, joint_attention_dim=16,
                                  pooled_projection_dim=8, guidance_embeds=False,
                                  axes_dims_rope=(2, 2, 4)).eval().requires_grad_(False)


def _flux_call(rows: int, image_tokens: int, text_tokens: int, branches: int = 1) -> ModelCall:
    generator = torch.Generator().manual_seed(rows * 100 + image_tokens)
    family = diffusers_dit.family_named("diffusers_dit:flux")
    ids = torch.stack([torch.zeros(image_tokens), torch.arange(image_tokens) // 3, torch.arange(image_tokens) % 3], 1)
    return ModelCall(torch.randn(rows, image_tokens, 8, generator=generator), torch.full((rows,), 0.7),
                     torch.randn(rows, text_tokens, 16, generator=generator),
                     {"pooled_projections": torch.randn(rows, 8, generator=generator), "img_ids": ids,
                      "txt_ids": torch.zeros(text_tokens, 3)},
                     branches=branches, shared=family.shared, row_lists=family.row_lists)


def _started(devices: str):
    pool = WorkerPool(devices)
    pool.start()
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def pool():
    yield from _started("cpu:2")


@pytest.fixture(scope="module")
def three_workers():
    yield from _started("cpu:3")


@pytest.fixture(scope="module")
def four_workers():
    yield from _started("cpu:4")


@pytest.fixture(scope="module")
def flux():
    return _tiny_flux()


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
@pytest.mark.parametrize("image_tokens, text_tokens", [(24, 6), (13, 5)], ids=["even", "odd"])
def test_a_sequence_split_call_equals_one_device(pool, flux, strategy, image_tokens, text_tokens):
    call = _flux_call(1, image_tokens, text_tokens)
    with torch.inference_mode():
        reference = forward_for_family("diffusers_dit:flux")(flux, call)
    result = ParallelExecutor(pool, ParallelConfig("cpu:2", strategy)).run(flux, "diffusers_dit:flux", call)
    assert result.mesh.describe() == f"{strategy} (cfg 1 x batch 1 x {strategy} 2)"
    assert result.out.shape == reference.shape
    assert (result.out - reference).abs().max() <= TOLERANCE * max(1.0, reference.abs().max().item())
    assert result.bytes_sent > 0  # the workers exchanged tokens: the split really happened


def test_ulysses_refuses_heads_that_do_not_divide_and_names_ring(pool):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    three_heads = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=0,
                                         attention_head_dim=8, num_attention_heads=3, joint_attention_dim=16,
                                         pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()
    with pytest.raises(Exception, match="use ring"):
        ParallelExecutor(pool, ParallelConfig("cpu:2", "ulysses")).run(three_heads, "diffusers_dit:flux",
                                                                       _flux_call(1, 8, 4))


@pytest.mark.parametrize("strategy", ["ulysses", "ring", "usp"])
def test_sequence_strategies_refuse_unets_and_families_without_a_split_before_any_work(strategy, monkeypatch):
    from parallel_backend import strategies
    from parallel_backend.models import comfy_dit, diffusers_dit, sequence_splits

    with pytest.raises(ValueError, match="token sequence of transformers \\(DiTs\\) only, and this model is a UNet"):
        strategies.get(strategy).check_family("diffusers_unet")
    for family in (*comfy_dit.FAMILIES[1:], *diffusers_dit.FAMILIES):  # every transformer family has a split
        strategies.get(strategy).check_family(family.wire)
    monkeypatch.delitem(sequence_splits.COMFY, "sd3")  # a family added without a row
    with pytest.raises(ValueError, match="no sequence split for sd3 models in ComfyUI yet"):
        strategies.get(strategy).check_family("comfy_dit:sd3")


def test_degrees_of_another_strategys_axis_are_refused():
    with pytest.raises(ValueError, match="ring 2: it splits the token sequence .*choose a strategy that does \\(ring, usp\\)"):
        ParallelConfig("cpu:2", "ulysses", ring=2)
    assert ParallelConfig("cpu:4", "ulysses", cfg_degree=2, ulysses=2).ulysses == 2


def test_bench_measures_ulysses_and_ring_at_cfg_1_with_outputs_equal_to_one_device(tmp_path):
    from parallel_backend.commands.bench import run_bench

    report = run_bench("flux-small", "cpu:2", ("ulysses", "ring"), steps=2, resolution=64, repeats=0, cfg=1.0,
                       progress=lambda line: None, plan=False)
    rows = {r["strategy"]: r for r in report["results"]}
    for strategy in ("ulysses", "ring"):
        row = rows[strategy]
        assert row["job"] == {"images": 1, "cfg": 1.0}
        assert row["max_abs_diff_vs_serial"] <= 1e-4  # flow-matching latents are of scale ~1
        assert row["transfer_bytes_per_call_median"] > 0 and "of the ideal with the exchange stubbed out" in row["summary"]
        # the exchange alone (a probe of the call's bytes) and what the ranks waited for it, per call
        assert row["transfer_seconds_alone"] > 0 and row["exposed_wait_seconds_per_call_median"] > 0
        assert f"exchange that takes {1000 * row['transfer_seconds_alone']:.1f} ms alone" in row["summary"]
        assert len(row["peak_memory_bytes_per_device"]) == 2


def test_bench_measures_usp_two_by_two_with_outputs_equal_to_one_device():
    from parallel_backend.commands.bench import run_bench

    report = run_bench("flux-small", "cpu:4", ("usp",), steps=1, resolution=64, repeats=0, cfg=1.0,
                       knobs={"ulysses": 2}, progress=lambda line: None, plan=False)
    row = next(r for r in report["results"] if r["strategy"] == "usp")
    assert row["devices"] == 4 and row["max_abs_diff_vs_serial"] <= 1e-4
    assert row["transfer_bytes_per_call_median"] > 0 and "of the ideal with the exchange stubbed out" in row["summary"]


@pytest.mark.parametrize("cfg", [1.0, 0.5])
def test_bench_cfg_is_checked_before_any_pool_starts(monkeypatch, cfg):
    from parallel_backend.commands import bench

    def no_pool(*args, **kwargs):
        raise AssertionError("a pool was started")

    monkeypatch.setattr(bench, "WorkerPool", no_pool)
    sentence = "cfg degree 2 needs cfg > 1" if cfg == 1.0 else "cfg must be a finite number from 1 to 100"
    with pytest.raises(ValueError, match=sentence):
        bench.run_bench("flux-small", "cpu:2", ("cfg",), steps=2, resolution=64, repeats=0, cfg=cfg)


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
def test_cfg_times_a_sequence_split_on_four_workers_equals_one_device(four_workers, flux, strategy):
    """4 CPU workers on 2 cores: correctness only (their speed here means nothing)."""
    call = _flux_call(2, 11, 5, branches=2)  # [uncond; cond]
    with torch.inference_mode():
        reference = forward_for_family("diffusers_dit:flux")(flux, call)
    config = ParallelConfig("cpu:4", strategy, cfg_degree=2, **{strategy: 2})
    result = ParallelExecutor(four_workers, config).run(flux, "diffusers_dit:flux", call)
    assert result.mesh.describe() == f"{strategy} (cfg 2 x batch 1 x {strategy} 2)"
    assert (result.out - reference).abs().max() <= TOLERANCE * max(1.0, reference.abs().max().item())


def _equals_one_device(flux, call, result) -> None:
    with torch.inference_mode():
        reference = forward_for_family("diffusers_dit:flux")(flux, call)
    assert result.out.shape == reference.shape
    assert (result.out - reference).abs().max() <= TOLERANCE * max(1.0, reference.abs().max().item())


@pytest.mark.parametrize("workers", [3, 4])
def test_ring_on_more_workers_equals_one_device_and_each_attention_makes_n_minus_1_passes(request, flux, workers):
    pool = request.getfixturevalue({3: "three_workers", 4: "four_workers"}[workers])
    call = _flux_call(1, 13, 5)  # 18 tokens: uneven shards
    result = ParallelExecutor(pool, ParallelConfig(f"cpu:{workers}", "ring")).run(flux, "diffusers_dit:flux", call)
    assert result.mesh.describe() == f"ring (cfg 1 x batch 1 x ring {workers})"
    _equals_one_device(flux, call, result)
    # every rank: N-1 passes per attention, and one for the gather of the output
    passes = {rank: extra["passes"] for rank, extra in result.extra.items()}
    assert passes == {rank: ATTENTIONS * (workers - 1) + 1 for rank in range(workers)}


def test_usp_two_by_two_on_four_workers_equals_one_device(four_workers, flux):
    from parallel_backend.strategies.sequence.ulysses import pipeline_chunks

    call = _flux_call(1, 13, 5)
    result = ParallelExecutor(four_workers, ParallelConfig("cpu:4", "usp", ulysses=2, ring=2)).run(
        flux, "diffusers_dit:flux", call)
    assert result.mesh.describe() == "usp (cfg 1 x batch 1 x ring 2 x ulysses 2)"
    _equals_one_device(flux, call, result)
    # per attention: the all-to-all there and back, and a ring of 2 (1 pass) for each chunk of the rank's 2 heads
    per_attention = 2 + pipeline_chunks(4 // 2) * 1
    assert {extra["passes"] for extra in result.extra.values()} == {ATTENTIONS * per_attention + 1}


@pytest.mark.parametrize("workers, degrees", [(2, "ring 1 x ulysses 2"), (3, "ring 3 x ulysses 1")])
def test_usp_with_no_degree_given_takes_what_the_workers_and_heads_allow(request, flux, workers, degrees):
    """The tiny Flux has 4 heads: on 2 workers ulysses takes both; 3 do not divide the heads, so ring takes them."""
    pool = request.getfixturevalue({2: "pool", 3: "three_workers"}[workers])
    call = _flux_call(1, 13, 5)
    result = ParallelExecutor(pool, ParallelConfig(f"cpu:{workers}", "usp")).run(flux, "diffusers_dit:flux", call)
    assert result.mesh.describe() == f"usp (cfg 1 x batch 1 x {degrees})"
    _equals_one_device(flux, call, result)
    assert result.bytes_sent > 0  # the workers exchanged tokens


def test_auto_keeps_the_tiny_transformer_on_one_device_and_says_why(pool, flux, caplog):
    """The tiny Flux's call takes a few ms: the pool's own cost per call outweighs any split, so the plan keeps
    it on one device (tests/test_auto_plan.py: flux-small, which it splits). The plan takes given figures (a fast
    link, no contention, the CPU pool's measured 4 ms overhead, 3 ms per row), not this machine's, which a loaded
    or a many-core machine would change."""
    caplog.set_level(logging.INFO, logger="tandem")
    call = _flux_call(1, 13, 5)  # cfg 1: one row, two devices
    executor = ParallelExecutor(pool, ParallelConfig("cpu:2"))
    fast = Link("fast-test-link", 1e9, 100e-6, "a test's link: 1 GB/s, 100 us per message")
    plan_auto_with(executor.engine, link=fast, contention=1.0, overhead_s=0.004, seconds_per_row=0.003)
    try:
        results = [executor.run(flux, "diffusers_dit:flux", call) for _ in range(3)]  # warm-up, measured, chosen
    finally:
        plan_auto_with(executor.engine)
    for result in results:
        _equals_one_device(flux, call, result)
        assert set(result.compute_s) == {0} and result.mesh.size == 1  # only rank 0 computed
    measured = [r.getMessage() for r in caplog.records if "auto ran the first two calls" in r.getMessage()]
    assert len(measured) == 1 and f"{ATTENTIONS} token-mixing attentions of 18 tokens x 4 heads" in measured[0]
    said = [r.getMessage() for r in caplog.records if "auto runs this call on one device" in r.getMessage()]
    assert len(said) == 1 and "no split is predicted to reach 1.05x" in said[0], said
