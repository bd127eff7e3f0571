"""One diffusion-model call as data: what the host sends and how it is cut into per-device shares."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch


def _map_tensors(value: Any, fn) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


@dataclass
class ModelCall:
    """The inputs of one denoiser call.

    x: (B, C, H, W) latents; t: a scalar timestep or (B,); context: (B, L, D) or None.
    extras: model-specific keyword inputs (e.g. SDXL's added_cond_kwargs); a tensor whose first dim is B is
      per-row and gets sliced with the rows, anything else goes to every device as is.
    branches: 2 when the rows are [uncond; cond] halves (classifier-free guidance in one batch), else 1.
    index: the call's number within the job (for error messages).
    step: the sampler step the call belongs to (its sigma's position in the schedule); None: the executor
      counts timestep changes. Warm-up of approximate strategies counts steps, not calls.
    stream: what is being denoised (e.g. the host's ids of the conds in the batch); stale state of
      approximate strategies is kept per stream, so separate cond and uncond calls never mix.
    job: the host's id of the sampling run; a new job starts from fresh state. None: the executor decides.
    shared: names of extras every share gets whole even where their first dim happens to equal B (positional
      ids, RoPE tables: the model family says which).
    row_lists: names of extras that are plain lists with one entry per row (e.g. per-image shapes), cut with
      the rows; one of another length (Qwen-Image's shapes are per prompt, not per image) goes whole.
    """

    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)
    branches: int = 1
    index: int = 0
    step: int | None = None
    stream: tuple = ()
    job: object = None
    shared: frozenset = frozenset()
    row_lists: frozenset = frozenset()

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    def select(self, rows: range) -> "ModelCall":
        """The same call restricted to `rows` (contiguous); per-row tensors are sliced, the rest shared."""
        n = self.rows

        def cut(value: torch.Tensor) -> torch.Tensor:
            return value[rows.start:rows.stop] if value.dim() > 0 and value.shape[0] == n else value

        def cut_input(name: str, value: Any) -> Any:
            if name in self.shared:
                return value
            if name in self.row_lists and len(value) == n:
                return type(value)(value[rows.start:rows.stop])
            return _map_tensors(value, cut)

        return replace(self, x=self.x[rows.start:rows.stop], t=cut(self.t),
                       context=None if self.context is None else cut(self.context),
                       extras={name: cut_input(name, value) for name, value in self.extras.items()}, branches=1)

    def to(self, device: torch.device | str) -> "ModelCall":
        move = lambda value: value.to(device, non_blocking=True)  # noqa: E731
        return replace(self, x=move(self.x), t=move(self.t), context=None if self.context is None else move(self.context),
                       extras=_map_tensors(self.extras, move))
