"""The model families that can be cut into stages, each with the adapter module that describes its layers.

Kept apart from stages.py, which the adapters themselves import (Activations, Context, Layer): the registry
sits above both, so stages.py never imports an adapter.
"""

from __future__ import annotations

from . import comfy_unet, diffusers_unet

STAGE_ADAPTERS = {diffusers_unet.FAMILY: diffusers_unet, comfy_unet.FAMILY: comfy_unet}


def adapter_for(family: str):
    """The module describing how `family` is cut into layers (models/stages.py's contract)."""
    if family not in STAGE_ADAPTERS:
        raise ValueError(f"model family {family!r} cannot be cut into stages; known: {', '.join(STAGE_ADAPTERS)}")
    return STAGE_ADAPTERS[family]
