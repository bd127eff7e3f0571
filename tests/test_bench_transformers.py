"""`tandem bench` on the narrow diffusers transformers (flux-small, wan-small): their inputs have the real
token counts, the exact strategies equal one device, and bad sizes or strategies are refused before a pool starts.

This checks what the bench reports, not how fast anything is: speed is read from bench runs, not tests.
"""

from __future__ import annotations

import json

import pytest

from parallel_backend.commands import bench
from parallel_backend.models.benchmodels import build_bench_model
from parallel_backend.commands.cli import main

pytestmark = pytest.mark.pool

FIELDS = {"strategy", "devices", "seconds_per_call_median", "end_to_end_seconds_median", "speedup_vs_serial",
          "ideal_speedup", "speedup_vs_serial_all_cores", "max_abs_diff_vs_serial", "psnr_vs_serial_db",
          "peak_memory_bytes_per_device"}


def test_default_sizes_give_the_real_token_counts():
    flux = build_bench_model("flux-small")
    resolution = bench.parse_resolution(flux.default_resolution)
    assert flux.latent_shape(1, resolution) == (1, 1024, 64) and flux.context_shape == (256, 512)
    extras = flux.extras(2, resolution)
    assert extras["img_ids"].shape == (1024, 3) and extras["txt_ids"].shape == (256, 3)
    assert extras["pooled_projections"].shape[0] == 2 and {"img_ids", "txt_ids"} <= flux.shared
    wan = build_bench_model("wan-small")
    resolution = bench.parse_resolution(wan.default_resolution)
    assert wan.frames == 17 and wan.latent_shape(1, resolution) == (1, 16, 5, 24, 40)
    assert wan.tokens(resolution) == 1200


@pytest.mark.slow
@pytest.mark.parametrize("model, size", [("flux-small", []), ("wan-small", ["--frames", "5"])])
def test_exact_strategies_on_transformers_equal_one_device(model, size, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", model, "--devices", "cpu:2", "--strategies", "cfg,batch", "--steps", "2",
                 "--repeats", "0", "--resolution", "64", *size, "--no-plan", "--quiet", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["model"] == model and report["resolution"] == [64, 64]
    assert report["frames"] == (5 if model == "wan-small" else None)
    assert [r["strategy"] for r in report["results"]] == ["serial", "cfg", "serial", "batch"]
    for row in report["results"]:
        assert FIELDS <= row.keys() and row["strategy"] in table
        assert len(row["peak_memory_bytes_per_device"]) == row["devices"]
        # Flow-matching latents stay O(1) (unit noise moved by velocity steps): 1e-4 absolute is 1e-4 of their
        # scale; splitting the rows may change a matmul's rounding, so equality is not asked for.
        assert row["max_abs_diff_vs_serial"] <= 1e-4, row
    assert [r["devices"] for r in report["results"]] == [1, 2, 1, 2]


@pytest.mark.parametrize("args, sentence", [
    (["--model", "wan-small", "--frames", "6"], "frames 6: model wan-small needs 4k + 1 frames"),
    (["--model", "wan-small", "--frames", "0"], "frames must be a whole number from 1 to"),
    (["--model", "flux-small", "--frames", "5"], "frames: model flux-small makes still images"),
    (["--model", "small", "--frames", "5"], "frames: model small makes still images"),
    (["--model", "flux-small", "--resolution", "72"], "resolution 72x72: model flux-small needs multiples of 16"),
    (["--model", "wan-small", "--resolution", "200x64"], "resolution 200x64: model wan-small needs multiples of 16"),
    (["--model", "flux-small", "--strategies", "asyncdiff"], "strategy 'asyncdiff' cuts UNets only"),
    (["--model", "wan-small", "--strategies", "cfg,asyncdiff"], "strategy 'asyncdiff' cuts UNets only"),
])
def test_bad_sizes_and_strategies_are_refused_before_a_pool_starts(args, sentence, monkeypatch, capsys):
    def no_pool(*_, **__):
        raise AssertionError("a pool started for a request that should have been refused")

    monkeypatch.setattr(bench, "WorkerPool", no_pool)
    assert main(["bench", *args, "--steps", "1", "--quiet"]) == 1
    error = capsys.readouterr().err
    assert sentence in error and error.count("\n") == 1


def test_frames_must_be_a_whole_number():
    assert main(["bench", "--model", "wan-small", "--frames", "2.5", "--quiet"]) == 2
