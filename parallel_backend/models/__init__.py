"""How each model family is called and cut. A family names an adapter; the engine never imports a host."""

from __future__ import annotations

from typing import Callable


def forward_for_family(family: str) -> Callable:
    """The function `forward(module, call: ModelCall) -> Tensor` for a model family."""
    if family == "diffusers_unet":
        from .diffusers_unet import forward

        return forward
    if family == "comfy_unet":
        from .comfy_unet import forward

        return forward
    raise ValueError(f"unknown model family {family!r}; known: diffusers_unet, comfy_unet")
