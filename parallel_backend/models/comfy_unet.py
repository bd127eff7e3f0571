"""ComfyUI's openaimodel.UNetModel (SD1.x / SD2.x / SDXL), duck-typed: nothing here imports ComfyUI.

The worker holds the host's own UNetModel object (unpickled with the host's ComfyUI on its import path) and
calls it as ComfyUI's BaseModel does. The call's extras carry `y` (SDXL's ADM vector), `control` (ControlNet
residuals computed by the host) and a `transformer_options` dict holding only plain data.
"""

from __future__ import annotations

import torch

FAMILY = "comfy_unet"


def forward(unet, call) -> torch.Tensor:
    """Runs ComfyUI's UNetModel on a ModelCall; returns the model output (B, C, H, W)."""
    extras = dict(call.extras)
    extras.setdefault("transformer_options", {})
    return unet(call.x, call.t, context=call.context, **extras)
