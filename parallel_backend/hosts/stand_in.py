"""What every stand-in for a pipeline's denoiser shares: it holds the real model (untouched: it is what ships to
the workers, and what `unparallelize` puts back), the executor, and reads through to the model's attributes."""

from __future__ import annotations

import weakref

import torch


class StandIn(torch.nn.Module):
    inner = "model"  # the attribute that holds the real model (the pipeline's own name for it)

    def __init__(self, model, executor, pipe):
        super().__init__()
        setattr(self, self.inner, model)
        object.__setattr__(self, "_executor", executor)
        object.__setattr__(self, "_pipe", weakref.ref(pipe))
        object.__setattr__(self, "_owned_pool", None)
        self.calls = 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules[self.inner], name)

    @property
    def real(self) -> torch.nn.Module:
        return self._modules[self.inner]

    def new_job(self) -> None:
        """A pipeline call begins (state kept between the calls of one job starts over)."""
