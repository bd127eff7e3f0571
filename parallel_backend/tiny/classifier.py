"""A digit classifier trained on the same data set, to score generated digits (the quality oracle)."""

from __future__ import annotations

from functools import lru_cache

import torch

from .data import pixels_to_digit_features


@lru_cache(maxsize=1)
def _fitted_classifier():
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    return SVC(gamma=0.001, C=10.0).fit(digits.data, digits.target)  # ~99% cross-validated on this data set


def classify_digits(pixels: torch.Tensor) -> torch.Tensor:
    """pixels: (N, 1, H, W) in [-1, 1] -> predicted digits (N,) int64."""
    predictions = _fitted_classifier().predict(pixels_to_digit_features(pixels).cpu().numpy())
    return torch.as_tensor(predictions, dtype=torch.long)


def digit_accuracy(pixels: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of generated digits the classifier reads as the digit that was asked for."""
    return (classify_digits(pixels) == labels.cpu()).float().mean().item()
