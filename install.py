"""Run by ComfyUI-Manager (and the A1111 WebUI) on install, with the pack folder as working directory.

Installs requirements.txt into the running Python, idempotently. torch is never installed or upgraded here:
the host (ComfyUI) brings its own, matched to its GPU; only if none is present does it say so and stop.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def main() -> int:
    if importlib.util.find_spec("torch") is None:
        print("Tandem: no torch in this Python; install the torch build for your GPU first (ComfyUI's guide).",
              file=sys.stderr)
        return 1
    wanted = [r for r in requirements() if not r.lower().startswith("torch")]
    command = [sys.executable, "-m", "pip", "install", "--upgrade-strategy", "only-if-needed", *wanted]
    print("Tandem:", " ".join(command))
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
