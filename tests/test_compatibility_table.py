"""The README's table of real workflows is the ComfyUI test set's list: a row per pattern of
tests/comfy/test_real_workflows.py, saying "split" exactly where that test expects the pool to run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _patterns() -> dict:
    spec = importlib.util.spec_from_file_location("real_workflows", ROOT / "tests" / "comfy" / "test_real_workflows.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)  # imports no ComfyUI: its workflows are built inside functions
    return module.PATTERNS


def _readme_rows() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    table = text.split("### Real workflows", 1)[1].split("\n\n")[2]
    rows = [line.strip("|").split("|") for line in table.splitlines()[2:]]
    return {name.strip(): outcome.strip() for name, outcome in rows}


def test_every_pattern_is_a_readme_row_with_its_outcome():
    patterns, rows = _patterns(), _readme_rows()
    assert list(rows) == list(patterns)
    for name, pattern in patterns.items():
        expected = "split" if pattern.stock_path is None else "stock path"
        assert rows[name].startswith(expected), (name, rows[name])
