"""`tandem workflow run`'s file handling and --set overrides (the server round trip is in tests/comfy)."""

from __future__ import annotations

import json

import pytest

from parallel_backend.workflow import WorkflowError, apply_settings, load_workflow

WORKFLOW = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20}, "_meta": {"title": "Main sampler"}},
    "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 512}},
    "5": {"class_type": "KSampler", "inputs": {"seed": 2}},
}


def test_overrides_by_id_title_and_unique_class(tmp_path):
    out = apply_settings(WORKFLOW, ["3.seed=7", "Main sampler.steps=30", "EmptyLatentImage.width=768",
                                    "5.sampler_name=dpmpp_2m", "5.denoise=0.5", "5.flag=true"])
    assert out["3"]["inputs"] == {"seed": 7, "steps": 30}
    assert out["4"]["inputs"]["width"] == 768
    assert out["5"]["inputs"] == {"seed": 2, "sampler_name": "dpmpp_2m", "denoise": 0.5, "flag": True}
    assert WORKFLOW["3"]["inputs"]["seed"] == 1  # the original is untouched


@pytest.mark.parametrize("setting, message", [
    ("KSampler.seed=3", "2 nodes"), ("9.seed=3", "no node"), ("seed=3", "write NODE.INPUT=VALUE"),
    ("3.seed", "write NODE.INPUT=VALUE"),
])
def test_bad_overrides_say_what_to_write(setting, message):
    with pytest.raises(WorkflowError, match=message):
        apply_settings(WORKFLOW, [setting])


def test_loading(tmp_path):
    api = tmp_path / "api.json"
    api.write_text(json.dumps(WORKFLOW))
    assert load_workflow(api) == WORKFLOW
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(WorkflowError, match="UI-format workflow"):
        load_workflow(ui)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(WorkflowError, match="is not JSON"):
        load_workflow(bad)
    with pytest.raises(WorkflowError, match="not found"):
        load_workflow(tmp_path / "missing.json")


def test_an_unreachable_server_is_one_line(tmp_path):
    from parallel_backend.cli import main

    api = tmp_path / "api.json"
    api.write_text(json.dumps(WORKFLOW))
    assert main(["workflow", "run", str(api), "--server", "http://127.0.0.1:9", "--quiet"]) == 1
