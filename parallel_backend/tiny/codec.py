"""The latent codec of the embedded digits model: a fixed linear map between 4x4 pixel patches and latents.

Pixels `(B, 1, 32, 32)` in [-1, 1] <-> latents `(B, 4, 8, 8)`. Each 4x4 patch (16 values) is projected on the
first 4 principal components of all patches in the data set and divided by that component's spread, so
the latents have roughly unit variance (the job SD's VAE scaling factor 0.18215 does). It is fitted in closed
form (PCA), so it is deterministic and needs no training; as with SD's VAE, the decoder is not an exact
inverse: it keeps 4 of 16 dimensions of every patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchCodec(nn.Module):
    def __init__(self, patch: int = 4, latent_channels: int = 4):
        super().__init__()
        self.patch = patch
        dim = patch * patch
        self.register_buffer("basis", torch.zeros(latent_channels, dim))  # rows: principal directions
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(latent_channels))

    @torch.no_grad()
    def fit(self, pixels: torch.Tensor) -> "PatchCodec":
        """pixels: (N, 1, H, W) -> fits basis, mean and scale in place (float64 SVD)."""
        patches = F.pixel_unshuffle(pixels.double(), self.patch)  # (N, P*P, H/P, W/P)
        flat = patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1])
        mean = flat.mean(0)
        _, singular, vh = torch.linalg.svd(flat - mean, full_matrices=False)
        k = self.basis.shape[0]
        basis = vh[:k]
        # SVD signs are arbitrary; fix them so a refit gives the same codec.
        basis = basis * torch.sign(basis.sum(1, keepdim=True) + 1e-12)
        self.basis.copy_(basis.float())
        self.mean.copy_(mean.float())
        self.scale.copy_((singular[:k] / (flat.shape[0] - 1) ** 0.5).float())
        return self

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (B, 1, H, W) in [-1, 1] -> latents: (B, C, H/P, W/P)."""
        patches = F.pixel_unshuffle(pixels, self.patch) - self.mean[:, None, None]
        return torch.einsum("kc,bchw->bkhw", self.basis, patches) / self.scale[:, None, None]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: (B, C, h, w) -> pixels: (B, 1, h*P, w*P), not clamped."""
        latents = latents.to(self.basis.dtype) * self.scale[:, None, None]
        patches = torch.einsum("kc,bkhw->bchw", self.basis, latents) + self.mean[:, None, None]
        return F.pixel_shuffle(patches, self.patch)
