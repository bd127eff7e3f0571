"""auto follows the plan (plan/calibrate.py) on a pool of 2 CPU workers: the first two calls of a key run whole
on rank 0, the second measured; the cost model chooses the mesh of the calls after them, says why once, and never
a split predicted under 1.05x. Every run equals one device; which ranks computed shows where each call ran.

The choices asserted here are made from figures the tests give (`plan.calibrate.plan_auto_with`: the link, the devices'
contention, the pool's overhead and one device's seconds per row of the measured call), so they are the same on 2
or 64 cores, loaded or idle: cfg on `small` at 128 px predicted at 1.83x; a token split of flux-small at 256 px at
1.3x or more whatever share of the call its attentions take (its 7.6 ms exchange all exposed); every split under
the slow link at 0.4x or less. The last test gives nothing and checks only what does not depend on the machine."""

from __future__ import annotations

import logging

import pytest
import torch

from parallel_backend import strategies
from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.engine.config import ParallelConfig
from parallel_backend.engine.pool_engine import engine_for
from parallel_backend.hosts.executor import ParallelExecutor
from parallel_backend.engine.oracle import Job, run_loop
from parallel_backend.plan.calibrate import auto_plans, plan_auto_with
from parallel_backend.plan.links import Link
from parallel_backend.plan.probe import DeviceFigures
from parallel_backend.runtime.pool import WorkerPool

pytestmark = pytest.mark.slow

ATOL = 1e-4
GUIDED, SMALL_PX = Job(1, 7.5), (128, 128)
ONE_IMAGE, FLUX_PX = Job(1, 1.0), (256, 256)
STEPS = 4  # two calls on one device (warm-up, measured), then two on the chosen mesh
SLOW = Link("slow-test-link", 1e6, 10e-3, "a test's link: 1 MB/s, 10 ms per message")
FAST = Link("fast-test-link", 1e9, 100e-6, "a test's link: 1 GB/s, 100 us per message")
GIVEN = dict(contention=1.0, overhead_s=0.004, seconds_per_row=0.05)  # with a link: no figure of this machine


@pytest.fixture(scope="module")
def pool():
    with WorkerPool("cpu:2", timeout_s=300) as started:
        started.start()
        yield started


@pytest.fixture
def engine(pool):
    engine = engine_for(pool)
    plan_auto_with(engine, link=FAST, **GIVEN)  # every test starts with no choice made
    yield engine
    plan_auto_with(engine)


@pytest.fixture(scope="module")
def small():
    return build_bench_model("small")


@pytest.fixture(scope="module")
def small_reference(small):
    return run_loop(small, GUIDED, SMALL_PX, steps=STEPS, repeats=0).latents


@pytest.fixture(scope="module")
def flux():
    return build_bench_model("flux-small")


def _auto(pool, model, job, resolution):
    return run_loop(model, job, resolution, steps=STEPS, repeats=0, executor=ParallelExecutor(pool, ParallelConfig("cpu:2")))


def _said(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def _ranks(run) -> list[set]:
    """Per call, the ranks that computed it."""
    return [set(call["extra"]) for call in run.calls]


def test_auto_at_cfg_chooses_cfg_for_small_measured_once_and_equals_one_device(pool, engine, small, small_reference,
                                                                               caplog):
    caplog.set_level(logging.INFO, logger="tandem")
    run = _auto(pool, small, GUIDED, SMALL_PX)
    torch.testing.assert_close(run.latents, small_reference, atol=ATOL, rtol=ATOL)
    assert [c["mesh"].describe() for c in run.calls[2:]] == ["cfg (cfg 2 x batch 1)"] * (STEPS - 2)
    assert _ranks(run) == [{0}, {0}] + [{0, 1}] * (STEPS - 2)  # one device, then both
    assert len(auto_plans(engine).decisions) == 1  # one key: measured once
    again = _auto(pool, small, GUIDED, SMALL_PX)  # a second job of the same shape: no new measurement
    assert _ranks(again) == [{0, 1}] * STEPS and len(auto_plans(engine).decisions) == 1
    torch.testing.assert_close(again.latents, small_reference, atol=ATOL, rtol=ATOL)
    measured = _said(caplog, "auto ran the first two calls")
    assert len(measured) == 1 and "measured the second (100.0 ms given in place of the measured " in measured[0]
    assert "link fast-test-link (given: " in measured[0], measured
    chose = _said(caplog, "auto chose")
    assert len(chose) == 1 and chose[0].startswith("Tandem: auto chose cfg (cfg 2 x batch 1) for this model and "
                                                   "shape: cfg (cfg 2 x batch 1) wins at "), chose


def test_auto_splits_the_sequence_of_one_flux_image_at_cfg_1_and_equals_one_device(pool, engine, flux, caplog):
    caplog.set_level(logging.INFO, logger="tandem")
    reference = run_loop(flux, ONE_IMAGE, FLUX_PX, steps=STEPS, repeats=0).latents
    run = _auto(pool, flux, ONE_IMAGE, FLUX_PX)
    scale = max(1.0, reference.abs().max().item())
    assert (run.latents - reference).abs().max() <= ATOL * scale  # the sequence tests' tolerance
    mesh = run.calls[-1]["mesh"]
    assert strategies.get(mesh.strategy).splits_tokens and mesh.size == 2, mesh.describe()
    assert _ranks(run)[2:] == [{0, 1}] * (STEPS - 2) and all(c["bytes"] > 0 for c in run.calls[2:])
    measured = _said(caplog, "auto ran the first two calls")
    assert len(measured) == 1 and "token-mixing attentions of 512 tokens x 8 heads" in measured[0], measured
    assert _said(caplog, "auto chose") == [_said(caplog, f"auto chose {mesh.describe()} for this model and shape: ")[0]]


def test_a_link_that_makes_every_split_lose_keeps_auto_on_one_device(pool, engine, small, small_reference, caplog):
    caplog.set_level(logging.INFO, logger="tandem")
    plan_auto_with(engine, link=SLOW, **GIVEN)  # the engine's hook for auto's figures
    run = _auto(pool, small, GUIDED, SMALL_PX)
    torch.testing.assert_close(run.latents, small_reference, atol=ATOL, rtol=ATOL)
    assert _ranks(run) == [{0}] * STEPS  # only rank 0 computed, every call
    assert {c["mesh"].size for c in run.calls} == {1}
    said = _said(caplog, "auto runs this call on one device")
    assert len(said) == 1 and said[0].startswith("Tandem: auto runs this call on one device: no split is predicted "
                                                 "to reach 1.05x; the best, "), said
    assert "link slow-test-link (given: " in _said(caplog, "auto ran the first two calls")[0]
    assert not _said(caplog, "auto chose") and not _said(caplog, "sits out:") and not _said(caplog, "sit out:")


def test_a_call_a_token_split_cannot_take_stays_on_whole_rows(pool, engine, flux, caplog, monkeypatch):
    """flux-small's one-image call that auto splits by tokens (above), refused a token split as a ControlNet
    residual refuses it: no split by tokens is predicted; one row cannot go round two devices: one device."""
    import parallel_backend.engine.pool_engine as engine_module

    caplog.set_level(logging.INFO, logger="tandem")
    monkeypatch.setattr(engine_module, "sequence_refusal", lambda family, call: "a test's input")
    reference = run_loop(flux, ONE_IMAGE, FLUX_PX, steps=3, repeats=0).latents
    run = run_loop(flux, ONE_IMAGE, FLUX_PX, steps=3, repeats=0, executor=ParallelExecutor(pool, ParallelConfig("cpu:2")))
    assert (run.latents - reference).abs().max() <= ATOL * max(1.0, reference.abs().max().item())
    assert _ranks(run) == [{0}] * 3
    (decision,) = auto_plans(engine).decisions.values()
    assert decision.inputs.shape.tokens == 0 and decision.choice.best.devices == 1
    assert _said(caplog, "auto keeps this call to whole rows (cfg, batch): it has a test's input")
    assert "no strategy can split this model on these devices" in _said(caplog, "auto runs this call on one device")[0]


def test_a_pool_of_another_size_or_a_refused_token_split_is_another_key():
    """The key holds the pool's device count (a pool restarted on more devices chooses anew) and whether the call
    may be split by tokens."""
    from parallel_backend.runtime.calls import ModelCall
    from parallel_backend.plan.calibrate import AutoPlans

    call = ModelCall(torch.zeros(2, 4, 8, 8), torch.zeros(2), torch.zeros(2, 3, 8), branches=2)
    assert AutoPlans.key("f", call, False, 2) != AutoPlans.key("f", call, False, 3)
    assert AutoPlans.key("f", call, False, 2) != AutoPlans.key("f", call, True, 2)


def test_the_measured_attentions_give_tokens_heads_and_time_and_ulysses_must_divide_those_heads():
    """Pure: the token-mixing attentions are the longest with equal query and key lengths (cross-attention to the
    text and a shorter self-attention left out); their heads decide which ulysses degrees may be chosen."""
    from parallel_backend.runtime.calls import ModelCall
    from parallel_backend.engine.mesh import SequenceHint
    from parallel_backend.runtime.messages import Computed
    from parallel_backend.models.attention_timing import Attention
    from parallel_backend.plan.calibrate import AutoPlans, token_mixing
    from parallel_backend.plan.model import meshes

    seen = [Attention(2, 2, 600, 600, 32, 4, 0.02), Attention(2, 2, 600, 77, 32, 4, 0.001),
            Attention(2, 2, 100, 100, 32, 4, 0.001), Attention(2, 2, 600, 600, 32, 4, 0.04)]
    mixing = token_mixing(seen)
    assert (mixing.count, mixing.tokens, mixing.heads, mixing.width) == (2, 600, 2, 64)
    assert mixing.seconds_per_row == pytest.approx(0.015)  # the median of 0.01 and 0.02 per row
    call = ModelCall(torch.zeros(2, 600, 16), torch.zeros(2), torch.zeros(2, 77, 8), branches=2)
    computed = Computed(torch.zeros(2, 600, 16), 10.0, extra={"attentions": seen, "one_row_s": 5.0})
    figures = DeviceFigures(Link("made up", 1e9, 1e-4, "a test's"), 1.0, 0.004)
    decision = AutoPlans().decide("key", "diffusers_dit:flux", call, computed, SequenceHint(None), ["cpu"] * 3,
                                  figures)
    assert decision.inputs.shape.heads == 2 and decision.inputs.shape.attentions == 2
    labels = {f"{m.strategy} {m.product()}" for m in meshes(decision.inputs, 3)}
    assert "ring cfg 1 x batch 1 x ring 3" in labels and "ulysses cfg 1 x batch 1 x ulysses 2" in labels
    assert not any(label.startswith("ulysses cfg 1 x batch 1 x ulysses 3") for label in labels)  # 2 heads
    assert decision.mesh.size > 1  # 10 s of compute: a split pays on any link


def test_with_nothing_given_auto_measures_the_pools_link_contention_and_overhead(pool, engine, small,
                                                                                small_reference, caplog):
    """No figure given: the pool's link, the CPU workers' contention and the pool's overhead are measured
    (plan/probe.py) before the choice; which mesh wins then depends on this machine's load, so only the output
    and the figures' provenance are checked."""
    caplog.set_level(logging.INFO, logger="tandem")
    plan_auto_with(engine)
    run = _auto(pool, small, GUIDED, SMALL_PX)
    torch.testing.assert_close(run.latents, small_reference, atol=ATOL, rtol=ATOL)
    (decision,) = auto_plans(engine).decisions.values()
    assert decision.inputs.link.name == "measured cpu<->cpu" and decision.inputs.contention >= 1.0
    assert decision.inputs.host_overhead_s > 0.0
    (measured,) = _said(caplog, "auto ran the first two calls")
    assert "link measured cpu<->cpu (measured on this pool: " in measured and "slower all busy" in measured
    assert "given" not in measured, measured
