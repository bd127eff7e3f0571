"""The plan's device inputs measured on a pool's own workers (plan/probe.py): the link between two workers and
their contention. Checks what the probes return and that the workers ran them, not how fast anything is."""

from __future__ import annotations

import json

import pytest

from parallel_backend.commands import cli
from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.engine.pool_engine import engine_for
from parallel_backend.engine.oracle import sample_call
from parallel_backend.plan.probe import LARGE_BYTES, contention_of, measure_calls, measure_link
from parallel_backend.runtime.pool import WorkerPool

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pool():
    with WorkerPool("cpu:2") as started:
        yield started


def test_the_link_is_measured_between_two_workers(pool):
    engine = engine_for(pool)
    link = measure_link(engine, repeats=2)
    assert link.name == "measured cpu<->cpu" and "measured on this pool" in link.source
    assert 0 < link.latency < 1.0 and 0 < link.bandwidth < float("inf")
    # the large swap took longer than the small one: what the bandwidth is made of
    assert link.seconds(LARGE_BYTES) > link.seconds(4)


def test_contention_compares_one_worker_alone_with_all_at_once(pool):
    model = build_bench_model("tiny")
    engine = engine_for(pool)
    fingerprint = engine.load(model.module, model.family)
    calls_before = pool.stats.calls if hasattr(pool, "stats") else None
    slowdown, overhead = measure_calls(engine, fingerprint, sample_call(model, 1, (32, 32)), repeats=1)
    assert 1.0 <= slowdown < 100.0 and 0.0 <= overhead < 10.0
    assert calls_before is None or pool.stats.calls == calls_before  # probes are not model calls of a job


def test_contention_counts_the_slowest_rank_of_each_round_against_its_own_pace():
    # rank 1 is a slower device (2x), not contention: each rank is measured against itself
    assert contention_of([({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})] * 3) == 1.0
    # no rank slower on average, but every call of both waits for the one that was slower that time
    alone = {0: 1.0, 1: 1.0}
    rounds = [(alone, {0: 1.1, 1: 0.9}), (alone, {0: 0.9, 1: 1.1}), (alone, {0: 1.1, 1: 1.0})]
    assert abs(contention_of(rounds) - 1.1) < 1e-12
    # a round the whole machine ran slower in (alone and together alike) reads as no contention
    assert contention_of([({0: 2.0, 1: 2.0}, {0: 2.0, 1: 2.0})]) == 1.0
    # the median of the rounds: one disturbed round does not move it; faster than alone is no contention
    assert abs(contention_of(rounds + [(alone, {0: 5.0, 1: 1.0}), (alone, {0: 1.1, 1: 1.1})]) - 1.1) < 1e-12
    assert contention_of([(alone, {0: 0.8, 1: 0.9})]) == 1.0


def test_a_pool_of_one_device_has_no_link_to_measure():
    with WorkerPool("cpu:1") as one:
        engine = engine_for(one)
        assert measure_link(engine) is None


def test_tandem_plan_measures_the_link_by_default(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--model", "tiny", "--devices", "cpu:2", "--json", str(out)]) == 0
    assert "link measured cpu<->cpu (measured on this pool" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["link"]["name"] == "measured cpu<->cpu" and report["inputs"]["contention"] >= 1.0
