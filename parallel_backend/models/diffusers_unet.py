"""diffusers UNet2DConditionModel: how one call runs (cuts into stages arrive with AsyncDiff)."""

from __future__ import annotations

import torch

FAMILY = "diffusers_unet"


def forward(unet, call) -> torch.Tensor:
    """Runs `unet` on a ModelCall; returns the noise prediction (B, C, H, W)."""
    return unet(call.x, call.t, encoder_hidden_states=call.context, return_dict=False, **call.extras)[0]
