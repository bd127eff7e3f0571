"""`tandem workflow run` against the real server: outputs come back; rejections and failures read well."""

from __future__ import annotations

import json
import subprocess
import sys


def tandem(*args):
    return subprocess.run([sys.executable, "-m", "parallel_backend", *args], capture_output=True, text=True,
                          timeout=300)


def test_run_downloads_the_outputs_and_applies_overrides(comfy_server, comfy, tmp_path):
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps(comfy.sampler_workflow("TandemKSampler", "cli_run", "cfg")))
    run = tandem("workflow", "run", str(workflow), "--server", comfy_server.url, "--set", "5.seed=43",
                 "--set", "5.steps=4", "--out", str(tmp_path / "out"), "--quiet")
    assert run.returncode == 0, run.stderr
    files = list((tmp_path / "out").rglob("cli_run*.latent"))
    assert len(files) == 1 and files[0].stat().st_size > 0, run.stdout
    assert comfy_server.get("/tandem/status")["last_run"]["calls"] == 4  # the override reached the sampler


def test_an_override_of_an_input_the_node_lacks_fails_before_submitting(comfy_server, comfy, tmp_path):
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps(comfy.sampler_workflow("TandemKSampler", "cli_misspelt", "asyncdiff")))
    runs = len(comfy_server.get("/history"))
    for setting, sentence in (("5.nosuch=1", "node 5 (TandemKSampler) has no input 'nosuch'"),
                              ("99.seed=1", "no node match '99'")):
        run = tandem("workflow", "run", str(workflow), "--server", comfy_server.url, "--set", setting,
                     "--out", str(tmp_path / "out"), "--quiet")
        assert run.returncode == 1 and sentence in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert len(comfy_server.get("/history")) == runs  # nothing was submitted
    # an optional input the workflow leaves out is one the server declares: accepted
    run = tandem("workflow", "run", str(workflow), "--server", comfy_server.url, "--set", "8.warmup=2",
                 "--out", str(tmp_path / "out"), "--quiet")
    assert run.returncode == 0, run.stderr


def test_a_rejected_workflow_gives_a_readable_error(comfy_server, tmp_path):
    workflow = tmp_path / "bad.json"
    workflow.write_text(json.dumps({"1": {"class_type": "NoSuchNode", "inputs": {}}}))
    run = tandem("workflow", "run", str(workflow), "--server", comfy_server.url, "--quiet")
    assert run.returncode != 0 and "NoSuchNode" in run.stderr and "Traceback" not in run.stderr


def test_a_failing_node_is_named(comfy_server, comfy, tmp_path):
    broken = comfy.sampler_workflow("TandemKSampler", "cli_fail", "cfg")
    broken["8"]["inputs"]["devices"] = "cpu:1"  # cfg needs two devices: the settings node raises
    workflow = tmp_path / "fail.json"
    workflow.write_text(json.dumps(broken))
    run = tandem("workflow", "run", str(workflow), "--server", comfy_server.url, "--quiet")
    assert run.returncode != 0 and "node 8 (TandemSettings) failed" in run.stderr, run.stderr
    assert "cfg 2 x batch 1 = 2 devices, but there are 1" in run.stderr


def test_the_multi_gpu_sampler_reports_progress_every_step(comfy_server, comfy, tmp_path):
    from parallel_backend.commands.workflow import run_workflow

    workflow = tmp_path / "progress.json"
    workflow.write_text(json.dumps(comfy.sampler_workflow("TandemKSampler", "cli_progress", "asyncdiff")))
    seen = []
    run_workflow(str(workflow), comfy_server.url, [], str(tmp_path / "out"), 300,
                 lambda node, value, total: seen.append((node, value, total)))
    sampler = [(value, total) for node, value, total in seen if node == "5"]
    values = [value for value, _ in sampler]
    assert {total for _, total in sampler} == {6}, seen
    version = comfy_server.get("/system_stats")["system"]["comfyui_version"]
    if tuple(int(part) for part in version.split(".")[:2]) < (0, 24):
        assert values == list(range(1, 7)), seen
    else:  # v0.24's ProgressBar drops updates closer than 100 ms to the last one (never the first or the last)
        assert values[0] == 1 and values[-1] == 6 and values == sorted(set(values)), seen


def test_compare_times_the_workflow_against_its_stock_twin_and_compares_outputs(comfy_server, comfy, tmp_path):
    workflow = tmp_path / "compare.json"
    workflow.write_text(json.dumps(comfy.sampler_workflow("TandemKSampler", "cli_compare", "cfg")))
    runs_before = comfy_server.get("/tandem/status")["runs"]
    run = tandem("workflow", "compare", str(workflow), "--server", comfy_server.url, "--repeats", "2",
                 "--out", str(tmp_path / "out"), "--json", str(tmp_path / "figures.json"), "--quiet")
    assert run.returncode == 0, run.stderr
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert [len(figures["seconds"][name]) for name in ("stock", "tandem")] == [2, 2]
    assert all(s > 0 for name in ("stock", "tandem") for s in figures["seconds"][name])
    assert comfy_server.get("/tandem/status")["runs"] == runs_before + 3  # warm-up + 2 timed, all on the pool
    assert figures["pool"]["devices"] == ["cpu", "cpu"]
    from safetensors.torch import load_file

    stock, tandem_latent = (load_file(str(next((tmp_path / "out" / name).rglob("cli_compare*.latent"))))["latent_tensor"]
                            for name in ("stock", "tandem"))
    comfy.assert_same_latents(tandem_latent, stock)  # the downloaded pair compare reported on
    assert list(figures["outputs"]) == ["6/latents/0"] and "of the scale" in figures["outputs"]["6/latents/0"]
    assert "speedup" in run.stdout and "tandem " in run.stdout
    assert "its last call: split as cfg (cfg 2 x batch 1)" in run.stdout  # what ran, from the pool's status


def test_compare_refuses_when_the_multi_gpu_runs_took_the_stock_path(comfy_server, comfy, tmp_path):
    """A method replaced on the model object keeps every call on the host, so the Multi-GPU sampler runs the stock
    path: stock against stock."""
    workflow = comfy.with_model_patch(comfy.sampler_workflow("TandemKSampler", "cli_compare_host_only", "cfg"),
                                      "TandemTestReplacedForward")
    path = tmp_path / "host_only.json"
    path.write_text(json.dumps(workflow))
    run = tandem("workflow", "compare", str(path), "--server", comfy_server.url, "--repeats", "1",
                 "--out", str(tmp_path / "out"), "--quiet")
    assert run.returncode == 1 and "only 0 of 2 Multi-GPU runs used the pool" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
