"""`tandem plan --calibrate` on two CPU devices, and `tandem plan --gpu ... --constants FILE`: the file holds the
fixed cost, the compute rate by work per device and the link, each measured (a pool is started for the link), and
a plan with it predicts from those figures, not the fitted ones: its one-device call is the file's line at the
model's counted FLOPs, and its link is the measured one unless --link names another. Bad files and misplaced
options are refused in one sentence. About a minute: the calls are timed for real."""

from __future__ import annotations

import json

import pytest

from parallel_backend.commands import cli

pytestmark = pytest.mark.pool  # the calibration starts a pool on the two devices to time their link


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrate") / "cpu.json"
    assert cli.main(["plan", "--calibrate", "--devices", "cpu:2", "--out", str(out)]) == 0
    return out, json.loads(out.read_text())


def _plan(tmp_path, *argv) -> dict:
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--model", "sdxl", "--gpu", "h100", "--gpus", "2", *argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_the_file_holds_each_figure_measured_on_the_devices(calibration):
    _, data = calibration
    assert data["format"] == 2 and data["devices"] == ["cpu", "cpu"] and data["bench_model"] == "flux-small"
    shards = data["shards"]
    assert [s["ranks"] for s in shards] == [1, 2, 4, 8]
    for s in shards:  # one rank of a Ulysses split of n computes about 1/n of the call (the text tokens' share)
        assert s["seconds"] > 0 and s["flops"] == pytest.approx(shards[0]["flops"] / s["ranks"], rel=0.1)
    assert data["launch_s"] >= 0 and data["half_work_flops"] >= 0 and data["flops_per_s"] > 1e8
    # the tiny call launches flux-small's kernels (its 2 double and 4 single blocks: some hundreds), and its time is
    # its launches' and its few FLOPs'
    tiny = data["tiny"]
    assert 100 < tiny["launches"] < 2000 and tiny["flops"] < shards[-1]["flops"] / 10
    launched = data["launch_s"] * tiny["launches"] + tiny["flops"] / data["flops_per_s"]
    assert launched == pytest.approx(tiny["seconds"], rel=1e-6) or data["launch_s"] == 0
    # the line the figures make holds the timed calls: the whole call and the eighth within a half (a 2-core
    # machine shared with other work times them; a wrong slope or intercept misses by far more)
    for s in (shards[0], shards[-1]):
        line = (s["flops"] + data["half_work_flops"]) / data["flops_per_s"]
        assert line == pytest.approx(s["seconds"], rel=0.5), (s, data)
    link = data["link"]
    assert link["kind"] == "peer" and link["bandwidth_bytes_per_s"] > 0 and link["latency_s"] > 0


def test_constants_from_the_file_replace_the_fitted_ones(calibration, tmp_path):
    from parallel_backend.plan.paper import count_job

    path, data = calibration
    fitted, measured = _plan(tmp_path, "--cfg", "1"), _plan(tmp_path, "--cfg", "1", "--constants", str(path))
    assert fitted["constants"] == "fitted" and measured["constants"] == str(path)
    from parallel_backend.plan.fitted import FITTED

    counted = count_job("sdxl_meta", (1024, 1024), 1)
    compute = (counted.flops[1] + data["half_work_flops"]) / data["flops_per_s"]
    one = max(compute, counted.launches * data["launch_s"]) + FITTED.step_s  # the sampler's step part stays fitted
    assert measured["inputs"]["call_seconds"]["1"] == pytest.approx(one, rel=1e-9)
    assert fitted["inputs"]["call_seconds"]["1"] != pytest.approx(one, rel=0.5)
    assert measured["link"]["bandwidth_bytes_per_s"] == data["link"]["bandwidth_bytes_per_s"]
    assert measured["link"]["latency_s"] == data["link"]["latency_s"]  # the measured latency holds the launch
    named = _plan(tmp_path, "--cfg", "1", "--constants", str(path), "--link", "nvlink-h100")
    assert named["link"]["name"] == "nvlink-h100"
    assert named["inputs"]["call_seconds"] == measured["inputs"]["call_seconds"]


@pytest.mark.parametrize("argv, said", [
    (["--calibrate"], "--calibrate needs --out FILE"),
    (["--calibrate", "--gpu", "h100", "--out", "x.json"], "leave out --gpu and --constants"),
    (["--constants", "x.json"], "--constants is for --gpu"),
    (["--weights-dtype", "fp8"], "--weights-dtype is for --gpu"),
    (["--model", "sdxl", "--gpu", "h100", "--out", "x.json"], "--out is for --calibrate"),
    (["--model", "sdxl", "--gpu", "h100", "--weights-dtype", "fp4"], "weights_dtype must be bf16 or fp8"),
])
def test_misplaced_options_are_refused_in_one_sentence(argv, said, capsys):
    assert cli.main(["plan", *argv]) != 0
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1, err


def test_a_file_that_is_not_a_calibration_is_refused_in_one_sentence(tmp_path, capsys):
    for text, said in (("{}", "not a file of tandem plan --calibrate"), ("not json", "cannot read a calibration file")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        assert cli.main(["plan", "--model", "sdxl", "--gpu", "h100", "--constants", str(bad)]) != 0
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
