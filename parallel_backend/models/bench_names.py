"""The bench models by name, checked before anything is built (benchmodels.py builds them, with torch), so
`tandem bench` and `tandem plan` refuse a wrong name or a clip length for an image model at once."""

from __future__ import annotations

UNETS = ("small", "sd15", "sdxl", "sd15-narrow", "sdxl-narrow")  # benchmodels.UNETS (tests/test_bench.py checks)
TRANSFORMERS = ("flux-small", "wan-small")  # benchmodels_dit.TRANSFORMERS
VIDEO = ("wan-small",)  # the models that make clips (--frames)


def check_bench_model_name(name: str) -> None:
    """Refuses a name that is no bench model, before anything is built."""
    if name not in ("tiny", *UNETS, *TRANSFORMERS):
        raise ValueError(f"unknown bench model {name!r}; choose one of: tiny, {', '.join([*UNETS, *TRANSFORMERS])}")


def check_still_images(name: str, frames: int | None) -> None:
    """Refuses a clip length for an image model."""
    if frames is not None and name not in VIDEO:
        raise ValueError(f"frames: model {name} makes still images; give --frames only with a video model (wan-small)")
