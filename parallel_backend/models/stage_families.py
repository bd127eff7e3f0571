"""The model families that can be cut into stages, each with the adapter module that describes its layers.

Kept apart from stages.py, which the adapters themselves import (Activations, Context, Layer): the registry
sits above both, so stages.py never imports an adapter. The families are named here and their adapters (which
import torch) loaded when a model is cut, so the strategy registry loads without torch.
"""

from __future__ import annotations

STAGE_FAMILIES = ("diffusers_unet", "comfy_unet")  # each adapter's FAMILY (tests/test_stage_layers.py checks)


def adapters() -> dict:
    """Family -> the adapter module describing how it is cut into layers (models/stages.py's contract)."""
    from . import comfy_unet, diffusers_unet

    return {module.FAMILY: module for module in (diffusers_unet, comfy_unet)}


def adapter_for(family: str):
    """The module describing how `family` is cut into layers."""
    if family not in STAGE_FAMILIES:
        raise ValueError(f"model family {family!r} cannot be cut into stages; known: {', '.join(STAGE_FAMILIES)}")
    return adapters()[family]
