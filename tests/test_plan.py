"""The cost model's arithmetic (parallel_backend/plan) on made-up inputs: traffic formulas, the ordering of
candidates in clear cases, the chooser's floor, the JSON shape, and `tandem plan` on the tiny model. No timing
is asserted: the one CLI run only checks what it prints and writes."""

from __future__ import annotations

import json

import pytest

from parallel_backend.commands import cli
from parallel_backend.engine.mesh import Mesh
from parallel_backend.plan.choose import FLOOR, choose
from parallel_backend.plan.links import PROFILES, Link, link_named
from parallel_backend.plan.model import Inputs, candidates, meshes, predict
from parallel_backend.plan.traffic import CallShape, host_traffic, ring_bytes, sequence_peer, ulysses_bytes

MIB = 2**20
# flux-small at 512 px in fp32: 1024 image + 256 text tokens, 8 heads x 64, 2 double + 4 single blocks; the
# prediction (1024 tokens x 64 channels) is gathered at the end.
FLUX_512 = CallShape(rows=1, input_bytes=1024 * 64 * 4 + 256 * 512 * 4, output_bytes=1024 * 64 * 4, tokens=1280,
                     width=512, heads=8, attentions=6, itemsize=4)
FAST = Link("fast", 1e15, 0.0, "made up")
SLOW = Link("slow", 1e8, 1e-3, "made up")


def flux_inputs(link: Link, call_s: float = 0.1, attention_s: float = 0.01, **fields) -> Inputs:
    return Inputs(FLUX_512, "diffusers_dit:flux", 1, {1: call_s}, link, attention_seconds=attention_s, **fields)


def test_flux_small_512_moves_30_25_mib_per_call_for_ulysses_and_ring_on_two_devices():
    # The figure the bench's counters report (both ranks' sends summed): 6 x (4 x 2.5 MiB / 2) + 0.25 MiB.
    assert sequence_peer(FLUX_512, ulysses=2, ring=1) == 30.25 * MIB
    assert sequence_peer(FLUX_512, ulysses=1, ring=2) == 30.25 * MIB
    for strategy in ("ulysses", "ring"):
        assert predict(flux_inputs(FAST), Mesh(strategy, 1, 1, (2,), 2)).peer_bytes_per_call == 30.25 * MIB


def test_flux_small_shapes_come_from_the_model_object():
    from parallel_backend.models.benchmodels import build_bench_model
    from parallel_backend.plan.measure import call_shape

    shape = call_shape(build_bench_model("flux-small"), (512, 512), rows=1)
    assert (shape.tokens, shape.width, shape.heads, shape.attentions, shape.output_bytes, shape.itemsize) == \
        (1280, 512, 8, 6, 1024 * 64 * 4, 4)
    assert sequence_peer(shape, 2, 1) == 30.25 * MIB


def test_wan_small_shapes_give_the_19_mib_the_bench_reports():
    from parallel_backend.models.benchmodels import build_bench_model
    from parallel_backend.plan.measure import call_shape

    shape = call_shape(build_bench_model("wan-small"), (192, 320), rows=1)  # 17 frames: 5 x 12 x 20 tokens
    assert (shape.tokens, shape.width, shape.attentions, shape.output_bytes) == (1200, 512, 4, 16 * 5 * 24 * 40 * 4)
    assert sequence_peer(shape, 2, 1) == 4 * 2 * 1200 * 512 * 4 + 16 * 5 * 24 * 40 * 4  # 19.04 MiB


def test_sequence_formulas_on_more_devices():
    qkv = FLUX_512.qkv_bytes
    assert ulysses_bytes(FLUX_512, 4) == 4 * qkv * 3 // 4
    assert ring_bytes(FLUX_512, 4) == 2 * qkv * 3
    # usp: the ulysses all-to-alls inside subgroups plus a ring among them; u = N is ulysses, u = 1 is ring
    assert sequence_peer(FLUX_512, 2, 2) == 6 * (ulysses_bytes(FLUX_512, 2) + ring_bytes(FLUX_512, 2)) + 3 * 64 * 4096
    assert sequence_peer(FLUX_512, 4, 1) == 6 * ulysses_bytes(FLUX_512, 4) + 3 * FLUX_512.output_bytes


def test_host_traffic_sends_each_device_its_rows_and_takes_one_prediction_per_group_back():
    guided = CallShape(rows=2, input_bytes=100, output_bytes=10)
    assert host_traffic(Mesh("cfg", 2, 1, (), 2), guided, 2).__dict__ == {"host_in": 200, "host_out": 20, "peer": 0}
    assert host_traffic(Mesh("ulysses", 1, 1, (2,), 2), FLUX_512, 1).host_in == 2 * FLUX_512.input_bytes
    assert host_traffic(Mesh("ulysses", 1, 1, (2,), 2), FLUX_512, 1).host_out == FLUX_512.output_bytes


def test_a_fast_link_makes_ulysses_beat_one_device_with_its_exchange_hidden():
    found = {c.label(): c for c in candidates(flux_inputs(FAST), 2)}
    ulysses = found["ulysses (cfg 1 x batch 1 x ulysses 2)"]
    assert ulysses.predicted_speedup == pytest.approx(2.0, rel=1e-5) and ulysses.exposed_seconds < 1e-6
    choice = choose(list(found.values()))
    assert choice.best.devices == 2 and choice.best.exact and "wins at 2.00x" in choice.reason


def test_a_slow_link_makes_the_chooser_keep_one_device_and_say_why():
    found = candidates(flux_inputs(SLOW, call_s=0.02, attention_s=0.002), 2)
    assert all(c.predicted_speedup < FLOOR for c in found if c.mesh)
    choice = choose(found)
    assert choice.best.mesh == {} and choice.best.strategy == "serial"
    assert choice.reason.startswith(f"one device: no split is predicted to reach {FLOOR:g}x; the best, ")
    assert "exchange not hidden" in choice.reason


def exchange_exposed(link: Link, strategy: str, attention_s: float) -> float:
    """Seconds per call of a 2-device sequence split's attention exchanges not hidden behind compute (less the
    output gather and the host's transfers, which are exposed whatever the attention)."""
    mesh = Mesh(strategy, 1, 1, (2,), 2)
    host = link.seconds(2 * FLUX_512.input_bytes, 2) + link.seconds(FLUX_512.output_bytes, 1)
    gather = FLUX_512.output_bytes / 2 / link.bandwidth
    return predict(flux_inputs(link, attention_s=attention_s), mesh).exposed_seconds - host - gather


def test_ring_hides_its_transfer_behind_the_block_attention_only_when_shorter():
    link = Link("exact", 2 * 640 * 512 * 4 / 0.004, 0.0, "made up")  # a pass (k, v of 640 tokens): 4 ms
    # block attention = 1/N^2 of the whole attention: 0.02 / 4 = 5 ms hides it; 0.01 / 4 = 2.5 ms leaves 1.5 ms
    assert exchange_exposed(link, "ring", 0.02) == pytest.approx(0.0, abs=1e-12)
    assert exchange_exposed(link, "ring", 0.01) == pytest.approx(6 * 0.0015)


def test_ulysses_hides_its_exchanges_behind_the_own_block_attentions_only_when_shorter():
    link = Link("exact", 3 * 640 * 512 * 4 / 2 / 0.003, 0.0, "made up")  # q, k, v out: 3 ms; the output back: 1 ms
    # own block: 1/N^3 of the attention: 0.04 / 8 = 5 ms hides both; 0.016 / 8 = 2 ms leaves 1 ms of q, k, v out
    assert exchange_exposed(link, "ulysses", 0.04) == pytest.approx(0.0, abs=1e-12)
    assert exchange_exposed(link, "ulysses", 0.016) == pytest.approx(6 * 0.001)


def test_on_a_free_link_every_sequence_split_reaches_its_device_count():
    found = {c.label(): c.predicted_speedup for c in candidates(flux_inputs(FAST), 4)}
    for label, devices in (("ulysses (cfg 1 x batch 1 x ulysses 4)", 4), ("ring (cfg 1 x batch 1 x ring 3)", 3),
                           ("usp (cfg 1 x batch 1 x ring 2 x ulysses 2)", 4)):
        assert found[label] == pytest.approx(devices, rel=1e-5)


def test_cfg_speedup_is_the_batch_ratio_on_a_free_link_and_the_host_overhead_counts():
    inp = Inputs(CallShape(rows=2, input_bytes=1, output_bytes=1), "diffusers_unet", 2, {1: 0.055, 2: 0.1}, FAST)
    cfg = predict(inp, Mesh("cfg", 2, 1, (), 2))
    assert cfg.predicted_speedup == pytest.approx(0.1 / 0.055)
    slower = predict(Inputs(**{**inp.__dict__, "host_overhead_s": 0.045}), Mesh("cfg", 2, 1, (), 2))
    assert slower.predicted_speedup == pytest.approx(1.0)
    # devices that slow each other down when all compute (shared cores): each device's compute stretches
    crowded = predict(Inputs(**{**inp.__dict__, "contention": 1.1}), Mesh("cfg", 2, 1, (), 2))
    assert crowded.predicted_speedup == pytest.approx(0.1 / (0.055 * 1.1))
    # Amdahl: a text encoder + VAE as long as the 20 calls leave half the run unsplit
    amdahl = predict(Inputs(**{**inp.__dict__, "serial_seconds": 2.0}), Mesh("cfg", 2, 1, (), 2))
    assert amdahl.predicted_speedup_end_to_end == pytest.approx(4.0 / (2.0 + 20 * 0.055))


def test_the_end_to_end_figure_counts_the_vae_decode_whole_against_in_bands():
    inp = Inputs(CallShape(rows=2, input_bytes=1, output_bytes=1), "diffusers_unet", 2, {1: 0.055, 2: 0.1}, FAST)
    mesh = Mesh("cfg", 2, 1, (), 2)
    decoded = predict(Inputs(**{**inp.__dict__, "decode_seconds": 3.0, "decode_split_seconds": 1.6}), mesh)
    assert decoded.predicted_speedup == predict(inp, mesh).predicted_speedup  # per step: no decode
    assert decoded.predicted_speedup_end_to_end == pytest.approx((20 * 0.1 + 3.0) / (20 * 0.055 + 1.6))
    # a decode that is not split costs the split run what it costs the whole one
    whole = predict(Inputs(**{**inp.__dict__, "decode_seconds": 3.0}), mesh)
    assert whole.predicted_speedup_end_to_end == pytest.approx((20 * 0.1 + 3.0) / (20 * 0.055 + 3.0))
    # each candidate says which decode its end to end counted
    assert (decoded.decode_seconds, decoded.decode_seconds_whole) == (1.6, 3.0)
    assert (whole.decode_seconds, whole.decode_seconds_whole) == (3.0, 3.0)
    assert {k: decoded.as_json()[k] for k in ("decode_seconds", "decode_seconds_whole")} == \
        {"decode_seconds": 1.6, "decode_seconds_whole": 3.0}


def test_asyncdiff_splits_by_the_layer_profile_is_stale_and_pays_its_warmup_end_to_end():
    shape = CallShape(rows=1, input_bytes=1, output_bytes=1, handover_bytes=(0, 10, 10, 10))
    inp = Inputs(shape, "diffusers_unet", 1, {1: 0.1}, FAST, layer_seconds=(1.0, 1.0, 1.0, 1.0), steps=10, warmup=2,
                 weight_bytes=1000, layer_weight_bytes=(100, 200, 300, 400))
    staged = predict(inp, Mesh("asyncdiff", 1, 1, (2,), 2))
    assert not staged.exact and staged.predicted_speedup == pytest.approx(2.0)
    assert staged.predicted_speedup_end_to_end == pytest.approx(1.0 / (0.2 + 0.4))  # 2 calls whole, 8 at half
    assert staged.memory_bytes_per_device == 700  # the heavier stage (300 + 400); no weights outside the layers
    assert choose(candidates(inp, 2), exact_only=True).best.mesh == {}  # no exact split of one row: one device


def test_meshes_follow_the_strategies_own_checks():
    labels = {f"{m.strategy} {m.product()}" for m in meshes(flux_inputs(FAST), 3)}
    assert "ring cfg 1 x batch 1 x ring 3" in labels and "ulysses cfg 1 x batch 1 x ulysses 2" in labels
    assert not any(label.startswith(("ulysses cfg 1 x batch 1 x ulysses 3", "asyncdiff", "cfg", "batch"))
                   for label in labels)  # 3 does not divide 8 heads; asyncdiff cuts UNets; one row, one branch
    unet = Inputs(CallShape(rows=2, input_bytes=1, output_bytes=1), "diffusers_unet", 2, {2: 0.1}, FAST)
    assert {m.strategy for m in meshes(unet, 4)} == {"cfg", "batch", "asyncdiff", "patch"}
    four_rows = Inputs(CallShape(rows=4, input_bytes=1, output_bytes=1), "diffusers_unet", 2, {4: 0.1}, FAST)
    assert max(m.size for m in meshes(four_rows, 2)) == 2  # no cfg 2 x batch 2 on two devices


def test_one_device_time_is_interpolated_between_measured_row_counts():
    inp = Inputs(CallShape(rows=4, input_bytes=1, output_bytes=1), "diffusers_unet", 1, {1: 1.0, 2: 1.8}, FAST)
    assert [inp.seconds(r) for r in (0, 1, 2, 4)] == pytest.approx([0.0, 1.0, 1.8, 3.6])


def test_candidates_as_json_carry_strategy_mesh_and_predicted_speedup():
    rows = [c.as_json() for c in candidates(flux_inputs(FAST), 4)]
    json.dumps(rows)
    assert all({"strategy", "mesh", "predicted_speedup", "exact", "memory_bytes_per_device"} <= set(r) for r in rows)
    assert {"strategy": "usp", "mesh": {"cfg": 1, "batch": 1, "ring": 2, "ulysses": 2}} in \
        [{"strategy": r["strategy"], "mesh": r["mesh"]} for r in rows]


def test_every_named_link_states_its_source_and_an_unknown_one_is_refused():
    assert {"pcie4x16", "pcie5x16", "nvlink-a100", "nvlink-h100", "ethernet-10g", "ethernet-100g"} <= set(PROFILES)
    assert all(link.source and link.bandwidth > 0 for link in PROFILES.values())
    assert link_named("pcie4x16").bandwidth == pytest.approx(31.5e9 * 0.8)
    with pytest.raises(ValueError, match="unknown link 'pcie9'; choose probe \\(measure it\\) or one of: pcie4x16"):
        link_named("pcie9")


def test_tandem_plan_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--model", "tiny", "--devices", "cpu:2", "--link", "nvlink-h100", "--json", str(out),
                     "--vae"]) == 0
    printed = capsys.readouterr().out
    assert "a prediction of the cost model" in printed and "choice: " in printed and "link nvlink-h100" in printed
    report = json.loads(out.read_text())
    assert report["prediction"] is True and report["choice"]["why"]
    assert {c["strategy"] for c in report["candidates"]} == {"serial", "cfg", "batch", "asyncdiff", "patch"}
    # a CPU pool's end to end includes the tiny VAE's decode: whole on one device, in 2 bands on the pool
    one, banded = report["inputs"]["decode_seconds"], report["inputs"]["decode_split_seconds"]
    assert one > 0 and banded > 0 and "end to end with the VAE decode" in printed
    serial = next(c for c in report["candidates"] if c["strategy"] == "serial")["predicted_seconds_per_call"]
    cfg = next(c for c in report["candidates"] if c["strategy"] == "cfg")
    assert cfg["predicted_speedup_end_to_end"] == pytest.approx((20 * serial + one) /
                                                                (20 * cfg["predicted_seconds_per_call"] + banded))
    # --vae: one line after the candidates, the tiny VAE's decode timed here and predicted in 2 bands
    last = printed.splitlines()[-2]  # then "tandem: wrote ..."
    vae = report["vae_decode"]
    assert last.startswith("VAE decode in bands of rows (a prediction): one device ")
    assert vae["split"]["devices"] == 2 and vae["one_device"]["predicted_seconds"] == vae["one_device_seconds_measured"]
    assert f"2 devices {vae['split']['predicted_seconds']:.3f} s ({vae['split']['predicted_speedup']:.2f}x)" in last


def test_contention_follows_the_rows_each_device_computes():
    shape = CallShape(rows=2, input_bytes=1, output_bytes=1, handover_bytes=(0, 0))
    inp = Inputs(shape, "diffusers_unet", 2, {1: 0.055, 2: 0.1}, FAST, layer_seconds=(1.0, 1.0), contention=1.1,
                 contention_by_rows=((2, 1.3),))
    assert [inp.contention_at(r) for r in (1, 2, 3)] == pytest.approx([1.1, 1.3, 1.3])
    cfg = predict(inp, Mesh("cfg", 2, 1, (), 2))  # one row per device: the one-row contention
    assert cfg.predicted_speedup == pytest.approx(0.1 / (0.055 * 1.1))
    staged = predict(inp, Mesh("asyncdiff", 1, 1, (2,), 2))  # both rows on every stage: the two-row contention
    assert staged.predicted_speedup == pytest.approx(0.1 / (0.05 * 1.3))


def test_a_measured_rank_share_replaces_the_even_split_of_a_sequence_call():
    even = predict(flux_inputs(FAST), Mesh("ulysses", 1, 1, (2,), 2))
    assert even.predicted_speedup == pytest.approx(2.0)
    # one rank computes 0.06 s of the 0.1 s call (the text tokens' work repeated on every rank, say)
    repeated = predict(flux_inputs(FAST, shard_seconds={(2, 1): 0.06}), Mesh("ulysses", 1, 1, (2,), 2))
    assert repeated.predicted_speedup == pytest.approx(0.1 / 0.06)
    ring = predict(flux_inputs(FAST, shard_seconds={(2, 1): 0.06}), Mesh("ring", 1, 1, (2,), 2))
    assert ring.predicted_speedup == pytest.approx(2.0)  # the ulysses figure is not the ring's
