"""The pipeline a surface's model argument names (cli `--model`, the demo's `--model`): the embedded digits
model or a local diffusers SD/SDXL folder.

It sits with the hosts rather than in commands/cli.py so the demo can load the same way without importing the cli,
which imports the demo to serve it.
"""

from __future__ import annotations


def load_pipeline(model: str | None, device: str | None):
    """The embedded digits model (model None) or a local diffusers SD/SDXL folder."""
    if model is None:
        from .tiny import TinyDigitsPipeline

        return TinyDigitsPipeline(device=device or "cpu")
    from .diffusers import DiffusersPipeline

    return DiffusersPipeline.load(model, device)
