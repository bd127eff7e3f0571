"""The training data: scikit-learn's bundled handwritten digits (1797 images, 8x8, values 0..16), no download."""

from __future__ import annotations

import torch
import torch.nn.functional as F

PIXEL_SIZE = 32


def digits_as_pixels(size: int = PIXEL_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (pixels: (N, 1, size, size) float32 in [-1, 1], labels: (N,) int64), bilinearly upsampled."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    pixels = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    return pixels.clamp(-1.0, 1.0), torch.tensor(digits.target, dtype=torch.long)


def pixels_to_digit_features(pixels: torch.Tensor) -> torch.Tensor:
    """pixels: (N, 1, H, W) in [-1, 1] -> (N, 64) on the data set's 8x8, 0..16 scale (for the classifier)."""
    small = F.adaptive_avg_pool2d(pixels.float(), (8, 8))
    return ((small.clamp(-1.0, 1.0) + 1.0) * 8.0).reshape(pixels.shape[0], 64)
