"""`tandem workflow run`'s file handling and --set overrides (the server round trip is in tests/comfy)."""

from __future__ import annotations

import json

import pytest

from parallel_backend.commands.workflow import WorkflowError, apply_settings, load_workflow

WORKFLOW = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20}, "_meta": {"title": "Main sampler"}},
    "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 512}},
    "5": {"class_type": "KSampler", "inputs": {"seed": 2}},
}


KSAMPLER_INPUTS = {"model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                   "latent_image", "denoise"}  # as /object_info declares them


def declared(class_type):
    return KSAMPLER_INPUTS if class_type == "KSampler" else set()


def test_overrides_by_id_title_and_unique_class(tmp_path):
    out = apply_settings(WORKFLOW, ["3.seed=7", "Main sampler.steps=30", "EmptyLatentImage.width=768",
                                    "5.sampler_name=dpmpp_2m", "5.denoise=0.5", "5.steps=[1]"], declared)
    assert out["3"]["inputs"] == {"seed": 7, "steps": 30}
    assert out["4"]["inputs"]["width"] == 768
    assert out["5"]["inputs"] == {"seed": 2, "sampler_name": "dpmpp_2m", "denoise": 0.5, "steps": [1]}
    assert WORKFLOW["3"]["inputs"]["seed"] == 1  # the original is untouched


@pytest.mark.parametrize("setting, inputs_of", [("3.nosuch=1", None), ("3.nosuch=1", declared),
                                                ("5.steps=4", None), ("4.batch_size=2", declared)])
def test_an_input_the_node_does_not_have_is_refused(setting, inputs_of):
    """Not in the workflow's node, and not declared for its class (or no declarations at hand)."""
    node = setting.split(".")[0]
    with pytest.raises(WorkflowError, match=rf"node {node} \(\w+\) has no input '\w+' \(its inputs: "):
        apply_settings(WORKFLOW, [setting], inputs_of)


def test_refused_overrides_fail_before_the_run_starts(tmp_path, capsys):
    from parallel_backend.commands.cli import main

    api = tmp_path / "api.json"
    api.write_text(json.dumps(WORKFLOW))
    # Nothing listens on port 9: a node that does not exist is refused without the server; an input node 3 lacks
    # needs the server's declarations, and without them nothing is made or run
    assert main(["workflow", "run", str(api), "--server", "http://127.0.0.1:9", "--set", "9.seed=1"]) == 1
    assert main(["workflow", "run", str(api), "--server", "http://127.0.0.1:9", "--set", "3.nosuch=1",
                 "--out", str(tmp_path / "out")]) == 1
    said = capsys.readouterr().err
    assert "no node match '9'" in said and "cannot reach" in said and not (tmp_path / "out").exists(), said


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
    with pytest.raises(WorkflowError, match="is not valid JSON"):
        load_workflow(bad)
    with pytest.raises(WorkflowError, match="not found"):
        load_workflow(tmp_path / "missing.json")


def test_an_unreachable_server_is_one_line(tmp_path):
    from parallel_backend.commands.cli import main

    api = tmp_path / "api.json"
    api.write_text(json.dumps(WORKFLOW))
    assert main(["workflow", "run", str(api), "--server", "http://127.0.0.1:9", "--quiet"]) == 1
