"""Tandem as a ComfyUI custom node pack (this folder goes into ComfyUI/custom_nodes/).

Importing it is cheap and has no side effects: no torch, no processes, no ports. ComfyUI calls
`comfy_entrypoint()`, which registers the Multi-GPU nodes and starts the worker pool in the background.
"""

import os
import sys

WEB_DIRECTORY = "./web"  # ComfyUI loads every .js here into its frontend (the Tandem sidebar tab)


def _make_engine_importable() -> None:
    # Workers run `python -m parallel_backend.engine.worker`, so the host must know the engine by that same top-level
    # name (pickled calls name its classes); a pack copied into custom_nodes/ is not pip-installed.
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        import parallel_backend  # noqa: F401
    except ImportError:
        sys.path.append(here)


async def comfy_entrypoint():
    _make_engine_importable()
    from .nodes import TandemExtension, activate

    activate()
    return TandemExtension()
