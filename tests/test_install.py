"""install.py (what ComfyUI-Manager runs): idempotent, and it never installs or replaces torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_install_keeps_torch_and_can_run_twice():
    before = torch.__version__
    for _ in range(2):
        run = subprocess.run([sys.executable, "install.py"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        assert " torch" not in run.stdout.split("install", 1)[1]  # torch is not among what it asks pip for
    after = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                           text=True, timeout=120).stdout.strip()
    assert after == before


def test_requirements_leave_torch_to_the_host():
    lines = [l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines() if l.strip() and l[0] != "#"]
    assert lines and not any(l.lower().startswith("torch") for l in lines)
