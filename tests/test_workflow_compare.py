"""`tandem workflow compare`'s pure parts: the stock twin of a workflow, output comparison, the table.
(The timed round trip against a real server is in tests/comfy/test_workflow_cli.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from parallel_backend.commands.workflow import WorkflowError
from parallel_backend.commands.workflow_compare import Comparison, _cached, _seconds, compare_files, stock_twin

EXAMPLE = Path(__file__).resolve().parents[1] / "workflows" / "multi_gpu_ksampler_api.json"


def test_the_example_workflow_s_twin_uses_the_stock_ksampler_and_drops_the_settings():
    workflow = json.loads(EXAMPLE.read_text())
    twin = stock_twin(workflow)
    assert twin["3"]["class_type"] == "KSampler" and "settings" not in twin["3"]["inputs"]
    assert "10" not in twin  # the settings node fed only the sampler
    assert {k: v for k, v in twin["3"]["inputs"].items()} == {k: v for k, v in workflow["3"]["inputs"].items()
                                                              if k != "settings"}
    assert {k: twin[k] for k in twin if k != "3"} == {k: workflow[k] for k in workflow if k not in ("3", "10")}
    assert workflow["3"]["class_type"] == "TandemKSampler"  # the original is untouched


def test_model_nodes_are_bypassed_even_when_chained_and_advanced_keeps_its_inputs():
    workflow = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
        "2": {"class_type": "TandemSettings", "inputs": {"devices": "auto", "strategy": "cfg"}},
        "3": {"class_type": "TandemModel", "inputs": {"model": ["1", 0], "settings": ["2", 0]}},
        "4": {"class_type": "TandemModel", "inputs": {"model": ["3", 0]}},
        "5": {"class_type": "CFGGuider", "inputs": {"model": ["4", 0], "cfg": 5.0}},
        "6": {"class_type": "BasicScheduler", "inputs": {"model": ["3", 0], "steps": 9}},
        "7": {"class_type": "TandemKSamplerAdvanced", "inputs": {"model": ["4", 0], "noise_seed": 3,
                                                                  "settings": ["8", 0]}},
        "8": {"class_type": "TandemSettings", "inputs": {"devices": "cuda:0,cuda:1", "strategy": "batch"}},
    }
    twin = stock_twin(workflow)
    assert set(twin) == {"1", "5", "6", "7"}
    assert twin["5"]["inputs"]["model"] == ["1", 0] and twin["6"]["inputs"]["model"] == ["1", 0]
    assert twin["7"] == {"class_type": "KSamplerAdvanced", "inputs": {"model": ["1", 0], "noise_seed": 3}}


def test_a_workflow_without_multi_gpu_nodes_says_what_to_do():
    with pytest.raises(WorkflowError, match="--against"):
        stock_twin({"1": {"class_type": "KSampler", "inputs": {"seed": 1}}})


def _png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def test_images_are_compared_in_8_bit_levels_with_psnr(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 250, (16, 16, 3))
    a = _png(tmp_path / "a.png", pixels)
    assert compare_files(a, _png(tmp_path / "b.png", pixels)) == "max |diff| 0/255, PSNR inf dB"
    changed = pixels.copy()
    changed[3, 4, 1] += 3
    verdict = compare_files(a, _png(tmp_path / "c.png", changed))
    expected_psnr = 10 * np.log10(255.0 ** 2 / (9 / pixels.size))
    assert verdict == f"max |diff| 3/255, PSNR {expected_psnr:.1f} dB"
    assert compare_files(a, _png(tmp_path / "d.png", pixels[:8])).startswith("different sizes")


def test_latents_are_compared_relative_to_their_scale(tmp_path):
    from safetensors.torch import save_file

    x = torch.zeros(1, 4, 8, 8)
    x[0, 0, 0, 0] = 200.0
    y = x.clone()
    y[0, 1, 2, 3] = 0.02
    for name, tensor in (("a", x), ("b", y)):
        save_file({"latent_tensor": tensor}, str(tmp_path / f"{name}.latent"))
    assert compare_files(tmp_path / "a.latent", tmp_path / "b.latent") == "max |diff| 0.02 (1.0e-04 of the scale)"
    (tmp_path / "c.txt").write_text("same")
    (tmp_path / "d.txt").write_text("same")
    assert compare_files(tmp_path / "c.txt", tmp_path / "d.txt") == "identical bytes"


def test_times_come_from_comfyui_s_history_and_cached_nodes_are_found():
    entry = {"status": {"messages": [["execution_start", {"timestamp": 1000}],
                                     ["execution_cached", {"nodes": ["4", "6"], "timestamp": 1001}],
                                     ["execution_success", {"timestamp": 3500}]]}}
    assert _seconds(entry) == 2.5
    assert _cached(entry) == {"4", "6"}
    with pytest.raises(WorkflowError, match="timestamps"):
        _seconds({"status": {"messages": []}})


def test_the_table_shows_median_best_and_speedup():
    result = Comparison(("stock", "tandem"), {"stock": [10.0, 12.0, 11.0], "tandem": [6.0, 5.0, 5.5]},
                        {"9/images/0": "max |diff| 1/255, PSNR 55.0 dB"},
                        {"devices": ["cuda:0", "cuda:1"], "strategy": "cfg", "mesh": "cfg (cfg 2 x batch 1)",
                         "devices_used": 2, "calls": 50, "median_seconds_per_call": 0.1})
    assert result.speedup() == 2.0
    lines = result.table().splitlines()
    assert lines[1].split() == ["stock", "3", "11.00", "10.00", "1.00x"]
    assert lines[2].split() == ["tandem", "3", "5.50", "5.00", "2.00x"]
    assert lines[3] == "output 9/images/0: max |diff| 1/255, PSNR 55.0 dB"
    assert lines[4] == ("pool: cuda:0, cuda:1; last run: 50 calls, median 100.0 ms per call; its last call: split as "
                        "cfg (cfg 2 x batch 1)")
    assert result.as_json()["speedup"] == 2.0


def test_the_table_says_when_the_pool_ran_the_call_on_one_device():
    """auto's plan kept the call whole on worker 0 (the status's strategy then reads 'batch'): the line says one
    device and nothing split, not a strategy that split nothing."""
    status = {"devices": ["cpu", "cpu"], "strategy": "batch", "mesh": "batch (cfg 1 x batch 1), 1 device idle",
              "devices_used": 1, "calls": 6, "median_seconds_per_call": 0.01}
    line = Comparison(("stock", "tandem"), {"stock": [1.0], "tandem": [1.0]}, {}, status).table().splitlines()[-1]
    assert line.endswith("its last call: the whole model on one device (1 idle): nothing was split")
    assert "batch" not in line and "strategy" not in line


def test_cli_refuses_zero_repeats_and_an_unreachable_server_in_one_line(tmp_path, capsys):
    from parallel_backend.commands.cli import main

    assert main(["workflow", "compare", str(EXAMPLE), "--repeats", "0", "--quiet"]) == 1
    assert "--repeats must be at least 1" in capsys.readouterr().err
    assert main(["workflow", "compare", str(EXAMPLE), "--server", "http://127.0.0.1:9", "--quiet"]) == 1
    assert "cannot" in capsys.readouterr().err


def test_an_unreadable_output_is_a_verdict_not_a_crash(tmp_path):
    (tmp_path / "a.latent").write_bytes(b"not safetensors")
    (tmp_path / "b.latent").write_bytes(b"not safetensors")
    assert compare_files(tmp_path / "a.latent", tmp_path / "b.latent").startswith("cannot compare (")


def test_comparing_a_workflow_with_itself_is_refused_before_anything_runs():
    from parallel_backend.commands.workflow_compare import compare_workflows

    with pytest.raises(WorkflowError, match="same graph"):
        compare_workflows(str(EXAMPLE), "http://127.0.0.1:9", [], against=str(EXAMPLE))
