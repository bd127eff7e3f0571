"""asyncdiff's schedule and cut as pure functions: no processes, no tensors."""

from __future__ import annotations

import itertools
import random

import pytest

from parallel_backend.strategies.asyncdiff import balance, explain, simulate, stage_costs, stage_step


def _brute_force_best(costs, stages):
    n = len(costs)
    return min(max(stage_costs(costs, list(cuts))) for cuts in itertools.combinations(range(1, n), stages - 1))


@pytest.mark.parametrize("seed", range(12))
def test_balanced_cut_is_optimal(seed):
    rng = random.Random(seed)
    costs = [rng.uniform(0.1, 5.0) for _ in range(rng.randint(4, 11))]
    for stages in range(1, min(4, len(costs)) + 1):
        cuts = balance(costs, stages)
        assert len(cuts) == stages - 1 and cuts == sorted(set(cuts)) and all(0 < c < len(costs) for c in cuts)
        assert max(stage_costs(costs, cuts)) == pytest.approx(_brute_force_best(costs, stages)), grid_of(costs, cuts)


def grid_of(costs, cuts):
    return f"costs {costs}, cuts {cuts}, stage costs {stage_costs(costs, cuts)}"


def test_cut_follows_the_work_not_the_layer_count():
    # a UNet-like profile: cheap down path, expensive up path; an even layer split would be badly unbalanced
    costs = [1] * 10 + [4] * 10
    cuts = balance(costs, 2)
    assert cuts[0] > 10 and max(stage_costs(costs, cuts)) <= 26


def test_cut_refuses_more_stages_than_layers():
    with pytest.raises(ValueError, match="cannot cut 3 layers into 4 stages"):
        balance([1, 1, 1], 4)


def _prediction_origins(grid):
    return [int(row[-1][1:]) for row in grid]


def test_warm_up_steps_run_in_sequence_and_are_exact():
    for calls_per_step in (1, 2):
        grid = simulate(stages=2, steps=4, warmup=2, calls_per_step=calls_per_step)
        exact = 2 * calls_per_step
        assert _prediction_origins(grid)[:exact] == list(range(exact)), "\n".join(map(str, grid))
        # after warm-up the prediction is one call stale with two stages
        assert _prediction_origins(grid)[exact:] == list(range(exact - 1, 4 * calls_per_step - 1))


def test_warm_up_covering_every_step_is_exact():
    grid = simulate(stages=3, steps=6, warmup=6)
    assert _prediction_origins(grid) == list(range(6))


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_after_warm_up_stage_k_works_k_calls_behind(stages):
    grid = simulate(stages=stages, steps=12, warmup=1)
    for call in range(stages + 1, 12):
        for k in range(stages):
            assert grid[call][k] == f"S{k}<c{call - k}", explain(stages, 12, 1)
        assert grid[call][-1] == f"c{call - stages + 1}"


def test_every_stage_computes_on_every_call_with_stride_one():
    for call, row in enumerate(simulate(stages=3, steps=8, warmup=1)):
        assert "-" not in row[:-1], row


def test_stride_two_exchanges_every_second_call_and_only_the_last_stage_works_between():
    steps, warmup = 9, 1
    for call in range(warmup, steps):
        plans = [stage_step(k, 2, call, warmup, 2, call - warmup) for k in range(2)]
        exchange = (call - warmup) % 2 == 0
        assert plans[0].compute == exchange and plans[0].send == exchange
        assert plans[1].compute and plans[1].receive == ("during" if exchange else "none")
    grid = simulate(stages=2, steps=steps, warmup=warmup, stride=2)
    assert [row[0] for row in grid[warmup:]] == ["S0<c1", "-", "S0<c3", "-", "S0<c5", "-", "S0<c7", "-"]


def test_sync_steps_receive_before_computing_and_async_steps_while_computing():
    assert stage_step(1, 2, 0, 1, 1, 0).receive == "before"
    assert stage_step(1, 2, 1, 1, 1, 0).receive == "during"
    assert stage_step(0, 2, 5, 1, 1, 4).input == "fresh"
    assert not stage_step(1, 2, 5, 1, 1, 4).send  # the last stage's output goes to the host


def test_explain_prints_a_call_by_device_grid():
    text = explain(2, 4, 2, devices=["cuda:0", "cuda:1"])
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["call", "step", "cuda:0", "(stage"]
    assert "latent of c1 (exact)" in lines[2] and "latent of c2" in lines[4] and "(exact)" not in lines[4]
    assert "warm-up 2 steps, stride 1" in lines[-1]


@pytest.mark.parametrize("seed", range(30))
def test_streamed_layers_keep_every_stage_within_the_cap_streaming_its_last_layers_only(seed):
    """Against every stage's own brute force: the fewest of its last layers whose streaming keeps the stage within
    the cap with its largest streamed layer mounted (zero-sized layers never streamed), and nothing of a stage
    within it already; where none does, one sentence."""
    from parallel_backend.strategies.asyncdiff import streamed

    rng = random.Random(seed)
    sizes = [rng.choice([0, rng.randint(1, 100)]) for _ in range(rng.randint(2, 12))]
    stages = rng.randint(1, min(4, len(sizes)))
    cuts = sorted(rng.sample(range(1, len(sizes)), stages - 1))
    held = [rng.randint(0, 20) for _ in range(stages)]
    cap = rng.randint(60, 250)
    bounds = [0, *cuts, len(sizes)]

    def fits(k, a, b, j):  # stage k holding layers [a, j), streaming the others
        return held[k] + sum(sizes[a:j]) + max(sizes[j:b], default=0) <= cap

    if any(not fits(k, a, b, a) for k, (a, b) in enumerate(zip(bounds, bounds[1:]))):
        with pytest.raises(ValueError, match="even streaming all its layers.*raise the memory per device"):
            streamed(sizes, held, cuts, cap)
        return
    chosen = streamed(sizes, held, cuts, cap)
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        start = next(j for j in range(b, a - 1, -1) if fits(k, a, b, j))
        assert [i for i in chosen if a <= i < b] == [i for i in range(start, b) if sizes[i] > 0]
