"""The example workflows: the API-format file and its UI-format twin describe the same graph."""

from __future__ import annotations

import json
from pathlib import Path

from parallel_backend.commands.workflow import WorkflowError, load_workflow

FOLDER = Path(__file__).resolve().parents[1] / "workflows"


def test_api_and_ui_twins_agree():
    api = load_workflow(FOLDER / "multi_gpu_ksampler_api.json")
    ui = json.loads((FOLDER / "multi_gpu_ksampler.json").read_text())
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in api.items()}
    api_links = {(str(src), slot, dst, name) for dst, node in api.items()
                 for name, value in node["inputs"].items() if isinstance(value, list) for src, slot in [value]}
    by_id = {n["id"]: n for n in ui["nodes"]}
    ui_links = {(str(src), src_slot, str(dst), by_id[dst]["inputs"][dst_slot]["name"])
                for _, src, src_slot, dst, dst_slot, _ in ui["links"]}
    assert ui_links == api_links
    try:
        load_workflow(FOLDER / "multi_gpu_ksampler.json")
        raise AssertionError("the UI file must be recognised as UI format")
    except WorkflowError as exc:
        assert "UI-format" in str(exc)


TITLE_HEIGHT = 30  # the UI draws a node's title bar above its `pos` (LiteGraph's NODE_TITLE_HEIGHT)


def _rectangle(node: dict) -> tuple[float, float, float, float]:
    (x, y), (width, height) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + width, y + height


def test_no_two_nodes_overlap_in_any_ui_workflow():
    ui_files = [path for path in sorted(FOLDER.glob("*.json"))
                if {"nodes", "links"} <= set(json.loads(path.read_text()))]
    assert ui_files
    for path in ui_files:
        nodes = json.loads(path.read_text())["nodes"]
        for i, a in enumerate(nodes):
            for b in nodes[i + 1:]:
                ax0, ay0, ax1, ay1 = _rectangle(a)
                bx0, by0, bx1, by1 = _rectangle(b)
                overlap = ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1
                assert not overlap, f"{path.name}: {a['type']} ({a['id']}) overlaps {b['type']} ({b['id']})"
