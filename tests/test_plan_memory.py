"""Memory as an input of the plan (plan/model.py candidates, plan/costs.py sharded_cost, plan/choose.py): every
candidate states its bytes per device, sharded-weights candidates hold 1/N of the blocks and pay their gathers,
a budget marks what fits, the choice takes the fastest that fits (tensor among them), and when nothing fits one
sentence names the smallest need. Then `tandem plan --memory-per-device` on flux-small: the chosen candidate
fits, and `tandem bench` under the same cap runs it and reports weights per device within it."""

from __future__ import annotations

import json

import pytest

from parallel_backend.commands import cli
from parallel_backend.engine.mesh import Mesh
from parallel_backend.plan.choose import NothingFits, choose
from parallel_backend.plan.links import Link
from parallel_backend.plan.model import Inputs, candidates, predict
from parallel_backend.plan.traffic import CallShape

GIB = 2**30
FLUX = CallShape(rows=1, input_bytes=1024 * 64 * 4, output_bytes=1024 * 64 * 4, tokens=1280, width=512, heads=8,
                 attentions=6, itemsize=4)
LINK = Link("made up", 1e9, 0.0, "made up: 1 GB/s")
# 8 GiB of weights: 1 GiB outside the blocks, 7 blocks of 1 GiB; 0.5 GiB of activations per row
BIG = Inputs(FLUX, "diffusers_dit:flux", 1, {1: 1.0}, LINK, attention_seconds=0.1, weight_bytes=8 * GIB,
             activation_bytes_per_row=GIB // 2, unit_bytes=(GIB,) * 7)


def test_a_sharded_candidate_holds_a_share_of_the_blocks_and_pays_its_gathers():
    whole = predict(BIG, Mesh("ulysses", 1, 1, (2,), 2))
    sharded = predict(BIG, Mesh("ulysses", 1, 1, (2,), 2), "sharded")
    activations = whole.memory_bytes_per_device - 8 * GIB
    assert sharded.memory_bytes_per_device == 1 * GIB + 7 * GIB // 2 + GIB + activations  # one block gathered
    gather = 7 * GIB / 2 / 1e9  # every device receives the other half of each block
    assert sharded.seconds_per_call == pytest.approx(whole.seconds_per_call + gather)
    assert sharded.peer_bytes_per_call == whole.peer_bytes_per_call + 7 * GIB
    hidden = predict(Inputs(**{**BIG.__dict__, "gathers_overlap": True}), Mesh("ulysses", 1, 1, (2,), 2), "sharded")
    assert hidden.seconds_per_call < sharded.seconds_per_call  # posted ahead: only what outlasts the compute shows
    assert hidden.memory_bytes_per_device == sharded.memory_bytes_per_device + GIB  # two blocks at once
    # the parts: the weights kept (the rest whole, half of each block), the blocks gathered, the activations
    assert (whole.weights_bytes_per_device, whole.gathered_bytes_per_device) == (8 * GIB, 0)
    assert (sharded.weights_bytes_per_device, sharded.gathered_bytes_per_device) == (1 * GIB + 7 * GIB // 2, GIB)
    assert (hidden.weights_bytes_per_device, hidden.gathered_bytes_per_device) == (1 * GIB + 7 * GIB // 2, 2 * GIB)
    for c in (whole, sharded, hidden):
        assert c.memory_bytes_per_device - c.weights_bytes_per_device - c.gathered_bytes_per_device == activations
    tensor = predict(BIG, Mesh("tensor", 1, 1, (2,), 2))  # half of the weights, the whole row's activations
    assert (tensor.weights_bytes_per_device, tensor.gathered_bytes_per_device) == (4 * GIB, 0)
    assert tensor.memory_bytes_per_device == 4 * GIB + GIB // 2


def test_pipefusions_candidate_holds_the_weights_of_the_cut_the_strategy_makes():
    """flux-small's shape: two double-stream blocks of 36 MiB, four single ones of 15, all of equal time. The
    plan's cut is the strategy's (strategies/pipefusion/cut.py): within the default cap it holds 6 + 72 MiB on
    stage 0 and runs four blocks on stage 1; given a memory per device (`stage_cap_bytes`) it cuts 3 / 3, faster,
    heavier."""
    from parallel_backend.strategies.pipefusion.cut import default_cap

    mib = 2**20
    flux = Inputs(FLUX, "diffusers_dit:flux", 1, {1: 1.0}, LINK, attention_seconds=0.1, weight_bytes=138 * mib,
                  layer_seconds=(1.0,) * 6, layer_weight_bytes=(36 * mib, 36 * mib) + (15 * mib,) * 4)
    mesh = Mesh("pipefusion", 1, 1, (2,), 2)
    capped, allowed = predict(flux, mesh), predict(Inputs(**{**flux.__dict__, "stage_cap_bytes": GIB}), mesh)
    assert capped.weights_bytes_per_device == 6 * mib + 72 * mib <= default_cap(138 * mib, 2)
    assert allowed.weights_bytes_per_device == 6 * mib + 87 * mib
    assert allowed.seconds_per_call < capped.seconds_per_call
    with pytest.raises(ValueError, match="raise --memory-per-device"):  # no cut fits: no candidate
        predict(Inputs(**{**flux.__dict__, "stage_cap_bytes": 70 * mib}), mesh)



def test_pipefusions_candidate_with_modulation_spread_holds_the_time_cut_within_the_cap():
    """The same blocks, each block's modulation movable (a double block's 12 MiB, a single block's 3): the plan
    cuts 3 / 3 as fast as on time alone and holds 72 / 72 MiB (93 / 51 less and plus two double blocks' 12, a
    single block's 3 back), and its note says what holds what."""
    from parallel_backend.strategies.pipefusion.cut import default_cap

    mib = 2**20
    flux = Inputs(FLUX, "diffusers_dit:flux", 1, {1: 1.0}, LINK, attention_seconds=0.1, weight_bytes=138 * mib,
                  layer_seconds=(1.0,) * 6, layer_weight_bytes=(36 * mib, 36 * mib) + (15 * mib,) * 4)
    mesh = Mesh("pipefusion", 1, 1, (2,), 2)
    allowed = predict(Inputs(**{**flux.__dict__, "stage_cap_bytes": GIB}), mesh)
    spread = predict(Inputs(**{**flux.__dict__, "layer_movable_bytes": (12 * mib, 12 * mib) + (3 * mib,) * 4}), mesh)
    assert spread.weights_bytes_per_device == 72 * mib <= default_cap(138 * mib, 2)
    assert spread.seconds_per_call == pytest.approx(allowed.seconds_per_call)
    assert "weights per stage 72 / 72 MiB, the modulation of 3 blocks on another stage" in spread.reason


def test_asyncdiffs_sharded_candidate_streams_what_the_time_cut_leaves_over_the_cap():
    """A UNet's shape: equal time per layer, the weights in the middle (sd15's low-resolution levels). The cut
    balanced on time (3 / 3) leaves stage 0 holding 4 + 4 + 30 + 30 = 68 of 100 MiB; sharded (a cap of 60 MiB),
    it streams its last layers (30, then 30 more: the first alone leaves 38 + 30 running, over the cap), holding
    8 MiB and one streamed layer at a time (both would not fit): on CPU workers in place (no time), on CUDA over
    the link beside the compute, exposed only where the copies outlast the slowest stage."""
    mib = 2**20
    shape = CallShape(rows=1, input_bytes=4096, output_bytes=4096, handover_bytes=(4096,) * 7)
    unet = Inputs(shape, "diffusers_unet", 1, {1: 1.0}, LINK, attention_seconds=0.1, weight_bytes=100 * mib,
                  layer_seconds=(1.0,) * 6, layer_weight_bytes=(4 * mib, 30 * mib, 30 * mib, 12 * mib, 10 * mib,
                                                                10 * mib))
    mesh = Mesh("asyncdiff", 1, 1, (2,), 2)
    held, cpu = predict(unet, mesh), predict(unet, mesh, "sharded")
    assert held.weights_bytes_per_device == 4 * mib + 64 * mib
    assert (cpu.weights_bytes_per_device, cpu.gathered_bytes_per_device) == (8 * mib, 30 * mib)
    assert cpu.memory_bytes_per_device - cpu.weights_bytes_per_device - cpu.gathered_bytes_per_device == \
        held.memory_bytes_per_device - held.weights_bytes_per_device
    assert cpu.seconds_per_call == pytest.approx(held.seconds_per_call)
    assert "2 layers (60 MiB) streamed from host memory per call" in cpu.reason
    slow = Link("slow", 1e8, 0.0, "made up: 0.1 GB/s")  # 60 MiB take 0.63 s, a stage's compute 0.5
    on_cuda = Inputs(**{**unet.__dict__, "gathers_overlap": True, "link": slow})
    held, cuda = predict(on_cuda, mesh), predict(on_cuda, mesh, "sharded")
    exposed = slow.seconds(60 * mib, 2) - (held.seconds_per_call - held.exposed_seconds)
    assert exposed > 0 and cuda.seconds_per_call == pytest.approx(held.seconds_per_call + exposed)
    assert any(c.strategy == "asyncdiff" and c.weights == "sharded" for c in candidates(unet, 2))


def test_a_budget_marks_what_fits_and_the_choice_takes_the_fastest_that_does():
    found = candidates(BIG, 2, budget_bytes=8 * GIB)
    assert all(c.fits == (c.memory_bytes_per_device <= 8 * GIB) for c in found)
    assert {c.weights for c in found if c.mesh and c.strategy != "tensor"} == {"replicated", "sharded"}
    assert not any(c.weights == "sharded" for c in found if c.strategy == "tensor")  # tensor divides its own
    choice = choose(found)
    assert choice.best.fits and "one device cannot hold" in choice.reason
    fitting = [c for c in found if c.fits and c.mesh]
    assert choice.best.predicted_speedup == max(c.predicted_speedup for c in fitting)
    rows = [c.as_json() for c in found]
    json.dumps(rows)
    assert all({"gib_per_device", "fits", "weights"} <= set(r) for r in rows)


def test_without_a_budget_nothing_is_marked_and_tensor_is_not_chosen():
    found = candidates(BIG, 2)
    assert all(c.fits is None for c in found)
    assert choose(found).best.strategy != "tensor"


def test_when_nothing_fits_one_sentence_names_the_smallest_need():
    found = candidates(BIG, 2, budget_bytes=GIB)
    with pytest.raises(NothingFits, match=r"^nothing fits the memory per device: the smallest need is [0-9.]+ GiB "
                                          r"per device, .* on 2 devices; raise --memory-per-device or add devices$"):
        choose(found)


@pytest.mark.slow
def test_tandem_plan_under_a_cap_chooses_what_fits_and_bench_runs_it(tmp_path, capsys):
    """flux-small (138 MiB of fp32 weights) capped at 0.15 GiB per device: one device does not fit with its
    activations; the plan's choice does, and the bench under the same cap holds its weights within it."""
    out = tmp_path / "plan.json"
    cap = "0.15"
    assert cli.main(["plan", "--model", "flux-small", "--devices", "cpu:2", "--cfg", "1", "--resolution", "256",
                     "--link", "loopback-gloo", "--memory-per-device", cap, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "memory per device: 0.150 GiB" in printed and "fits" in printed
    report = json.loads(out.read_text())
    choice = report["choice"]
    assert choice["fits"] is True and choice["gib_per_device"] <= float(cap)
    serial = next(c for c in report["candidates"] if c["strategy"] == "serial")
    assert serial["fits"] is False
    strategy = choice["strategy"]
    bench = tmp_path / "bench.json"
    assert cli.main(["bench", "--model", "flux-small", "--devices", "cpu:2", "--strategies", strategy, "--cfg", "1",
                     "--resolution", "256", "--steps", "2", "--repeats", "1", "--no-plan", "--quiet",
                     "--weights", choice["weights"], "--memory-per-device", cap, "--json", str(bench)]) == 0
    rows = json.loads(bench.read_text())["results"]
    run = next(r for r in rows if r["strategy"].startswith(strategy))
    assert all(w <= float(cap) * 2**30 for w in run["weights_bytes_per_device"])
    assert run["max_abs_diff_vs_serial"] <= 1e-4 * 10
