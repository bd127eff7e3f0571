"""`tandem bench` keeps its contract (PERFORMANCE.md's JSON fields) and its exact strategies stay exact.

This checks what the bench reports, not how fast anything is: speed is read from bench runs, not tests.
"""

from __future__ import annotations

import json
import math

import pytest

from parallel_backend.commands.bench import parse_resolution
from parallel_backend.commands.cli import main

pytestmark = pytest.mark.pool

FIELDS = {"strategy", "devices", "seconds_per_call_median", "end_to_end_seconds_median", "speedup_vs_serial",
          "ideal_speedup", "speedup_vs_serial_all_cores", "max_abs_diff_vs_serial", "psnr_vs_serial_db",
          "peak_memory_bytes_per_device"}


@pytest.mark.slow
def test_bench_reports_every_field_and_exact_strategies_match(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny", "--devices", "cpu:2", "--strategies", "cfg,batch", "--steps", "3",
                 "--repeats", "1", "--quiet", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and report["resolution"] == [32, 32] and report["steps"] == 3
    assert report["devices"] == ["cpu", "cpu"]
    strategies = [r["strategy"] for r in report["results"]]
    assert strategies == ["serial", "cfg", "serial", "batch"]
    for row in report["results"]:
        assert FIELDS <= row.keys()
        assert row["max_abs_diff_vs_serial"] <= 1e-4
        assert row["seconds_per_call_median"] > 0 and row["ideal_speedup"] > 0
        assert len(row["peak_memory_bytes_per_device"]) == row["devices"]
        assert row["strategy"] != "serial" or math.isinf(row["psnr_vs_serial_db"])
        assert row["strategy"] in table
        if row["strategy"] != "serial":  # the plan's prediction beside the measurement, from one-device inputs
            assert row["predicted_speedup"] > 0 and "compute on the busiest device" in row["prediction_reason"]
            assert row["prediction_error"] == pytest.approx(row["predicted_speedup"] / row["speedup_vs_serial"] - 1)
        # end to end with the VAE decode: here for serial, in two bands equal to it for the strategies
        assert row["decode_seconds"] > 0 and row["decode_bands"] == (1 if row["strategy"] == "serial" else 2)
        assert row["decode_max_abs_diff_vs_serial"] <= 1e-4
        assert row["end_to_end_with_decode_seconds"] == pytest.approx(row["end_to_end_seconds_median"]
                                                                      + row["decode_seconds"])
    assert " plan " in table.splitlines()[1]
    assert "end to end with the VAE decode" in table


def test_bench_refuses_unknown_strategies_and_models():
    assert main(["bench", "--strategies", "warp", "--quiet"]) == 1
    assert main(["bench", "--model", "sd99", "--steps", "1", "--quiet"]) == 1


def test_the_names_checked_without_torch_are_the_catalogue():
    from parallel_backend.commands.bench import DTYPES
    from parallel_backend.commands.bench_inputs import DTYPE_NAMES
    from parallel_backend.models import bench_names, benchmodels, benchmodels_dit

    assert bench_names.UNETS == tuple(benchmodels.UNETS) and bench_names.TRANSFORMERS == tuple(benchmodels_dit.TRANSFORMERS)
    assert DTYPE_NAMES == tuple(DTYPES)


@pytest.mark.parametrize("text, expected", [("256", (256, 256)), ("1024x768", (1024, 768)), (512, (512, 512))])
def test_resolutions(text, expected):
    assert parse_resolution(text) == expected


@pytest.mark.parametrize("text", ["big", "0", "12x12x12"])
def test_bad_resolutions(text):
    with pytest.raises(ValueError, match="write pixels as"):
        parse_resolution(text)


@pytest.mark.slow
def test_bench_reports_asyncdiff_cut_and_transfers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny", "--devices", "cpu:2", "--strategies", "asyncdiff", "--steps", "4",
                 "--repeats", "1", "--warmup", "4", "--no-plan", "--quiet", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    row = json.loads(out.read_text())["results"][1]
    assert row["strategy"] == "asyncdiff" and FIELDS <= row.keys()
    assert "predicted_speedup" not in row  # --no-plan: the plan's inputs not measured, nothing predicted
    assert row["max_abs_diff_vs_serial"] <= 1e-4  # warm-up covering every call: exact
    assert len(row["stage_shares"]) == 2 and sum(row["stage_shares"]) == pytest.approx(1.0)
    assert row["ideal_speedup"] == pytest.approx(1 / max(row["stage_shares"]))
    assert row["transfer_bytes_per_call_median"] > 0 and row["warmup"] == 4
    assert row["transfer_seconds_alone"] > 0 and 0 <= row["overlapped_fraction"] <= 1
    assert "asyncdiff: 2 stages, work shares" in table


def test_the_bench_notices_other_load_on_the_machine(tmp_path):
    """Another process's CPU time counts in the share, in full: on any number of cores and whatever else runs."""
    import subprocess
    import sys
    import time

    psutil = pytest.importorskip("psutil")
    from parallel_backend.commands.bench_load import _other_load

    spent, script = tmp_path / "cpu_seconds", tmp_path / "busy.py"
    script.write_text("import os, sys, time\nwhile time.process_time() < 1.0: pass\n"  # 1 s of CPU, however loaded
                      "open(sys.argv[1] + '.part', 'w').write(str(time.process_time()))\n"
                      "os.replace(sys.argv[1] + '.part', sys.argv[1])\n")
    started = time.monotonic()
    share = _other_load()
    subprocess.run(["sh", "-c", f"'{sys.executable}' '{script}' '{spent}' &"], timeout=30)  # an orphan of sh
    until = time.monotonic() + 60
    while not spent.exists() and time.monotonic() < until:
        time.sleep(0.1)
    other_cpu_s = float(spent.read_text())
    seen = share()
    elapsed = time.monotonic() - started  # at least the share's own span
    assert seen * elapsed * psutil.cpu_count() >= other_cpu_s - 0.1, (seen, elapsed, other_cpu_s)


def test_workers_forked_by_the_launcher_count_as_the_bench_own_once_ended(monkeypatch):
    """The launcher, not the bench, reaps the CPU workers it forked: their CPU time must still count as the bench's
    own, or every bench run would call its own ended pools other load."""
    psutil = pytest.importorskip("psutil")
    from parallel_backend.commands.bench_load import _own_cpu_seconds
    from parallel_backend.engine.config import ParallelConfig
    from parallel_backend.engine.oracle import job_for, run_loop
    from parallel_backend.hosts.executor import ParallelExecutor
    from parallel_backend.models.benchmodels import build_bench_model
    from parallel_backend.runtime.pool import WorkerPool

    monkeypatch.setenv("TANDEM_FORK_WORKERS", "1")
    me, model = psutil.Process(), build_bench_model("tiny")
    pool = WorkerPool("cpu:2")
    try:
        pool.start()
        launcher = psutil.Process(psutil.Process(pool.worker_pids()[0]).ppid())
        ended_before = launcher.cpu_times().children_user + launcher.cpu_times().children_system
        before = _own_cpu_seconds(me)
        run_loop(model, job_for("cfg"), (model.default_resolution,) * 2, steps=8, repeats=0,
                 executor=ParallelExecutor(pool, ParallelConfig("cpu:2", "cfg")))
    finally:
        pool.shutdown()
    ended = launcher.cpu_times().children_user + launcher.cpu_times().children_system - ended_before
    assert ended > 0  # the workers ended, and the launcher reaped them
    assert _own_cpu_seconds(me) - before >= ended


def test_a_disturbed_run_says_so_in_its_table():
    from parallel_backend.commands.bench import format_table
    from parallel_backend.commands.bench_load import _spread

    assert _spread([1.0, 1.05, 1.02]) < 0.10 < _spread([1.0, 1.2])
    report = {"model": "tiny", "resolution": [32, 32], "steps": 3, "devices": ["cpu", "cpu"], "threads_per_device": 1,
              "results": [], "disturbed": ["serial (1 image, cfg 7.5): repeats spread 20% (> 10%)"]}
    assert "DISTURBED RUN, figures unreliable: serial (1 image, cfg 7.5): repeats spread 20%" in format_table(report)
