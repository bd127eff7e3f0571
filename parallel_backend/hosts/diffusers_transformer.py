"""Stands in for a diffusers pipeline's transformer (Flux, SD3, Wan, Qwen-Image): every call runs on the pool.

Two ways a pipeline guides, both split exactly by the cfg strategy:
- one call of [uncond; cond] rows (SD3), recognised by its two halves of latents being the same;
- two calls per step inside `transformer.cache_context("cond")` / `("uncond")` (Flux true CFG, Qwen-Image, Wan):
  from a job's second step on, the cond call also computes the guessed uncond call in the same pool call, and
  the uncond call gets that result when its inputs are exactly the guessed ones (see branch_pairs). Where the
  branches cannot be stacked (text of different lengths) they run one after the other, each split by rows.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from . import branch_pairs as pairs
from .stand_in import StandIn

log = logging.getLogger("tandem")
_CALL_INPUTS = ("hidden_states", "timestep", "encoder_hidden_states")  # ModelCall's x, t, context


@dataclass
class Pairing:
    """One job's state of its cond/uncond pairs: what the uncond call replaces, and the kept uncond result."""

    changes: dict | None = None  # learned from the first pair; None until then
    joinable: bool = True
    first_cond: tuple | None = None  # (live inputs, snapshot) of the cond call waiting for its first uncond
    kept: tuple | None = None  # (snapshot of the guessed uncond inputs, its output)
    hits: int = 0
    misses: int = 0


class ParallelTransformer(StandIn):
    inner = "transformer"

    def __init__(self, transformer, executor, pipe, family):
        super().__init__(transformer, executor, pipe)
        self.family = family
        self.branch = None  # the cache context the pipeline is in ("cond", "uncond")
        self.pairing = Pairing()
        self._input_names = list(inspect.signature(transformer.forward).parameters)
        self._said: set[str] = set()  # why the branches ran one after the other, as the log was told

    def new_job(self) -> None:
        self.pairing = Pairing()

    @contextmanager
    def cache_context(self, name: str, **kwargs):
        """The pipeline says which branch its next call computes; the model's own cache context is entered too."""
        own = getattr(self.real, "cache_context", None)
        with own(name, **kwargs) if own is not None else nullcontext():
            previous, self.branch = self.branch, name
            try:
                yield
            finally:
                self.branch = previous

    def forward(self, *args, return_dict: bool = True, **kwargs):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        inputs = dict(zip(self._input_names, args)) | kwargs
        return_dict = inputs.pop("return_dict", return_dict)
        if self.branch == "cond":
            out = self._cond(inputs)
        elif self.branch == "uncond":
            out = self._uncond(inputs)
        else:
            out = self._run(inputs, 2 if self._holds_both_branches(inputs["hidden_states"]) else 1)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def _holds_both_branches(self, x: torch.Tensor) -> bool:
        """A guided pipeline's call of [uncond; cond] rows: the two halves of its latents are the same."""
        pipe, half = self._pipe(), x.shape[0] // 2
        return (bool(getattr(pipe, "do_classifier_free_guidance", False)) and x.shape[0] % 2 == 0
                and torch.equal(x[:half], x[half:]))

    def _cond(self, inputs: dict) -> torch.Tensor:
        p = self.pairing
        p.kept = None
        if p.changes is None:
            p.first_cond = (inputs, pairs.snapshot(inputs))
        if p.changes is None or not p.joinable:
            return self._run(inputs, 1)
        guessed = pairs.guess(inputs, p.changes)
        rows = inputs["hidden_states"].shape[0]
        try:
            joined = pairs.join(guessed, inputs, rows, self.family.shared, self.family.row_lists)
        except pairs.CannotJoin as exc:
            self._one_after_the_other(str(exc))
            return self._run(inputs, 1)
        out = self._run(joined, 2)
        p.kept = (pairs.snapshot(guessed), out[:rows])
        return out[rows:]

    def _uncond(self, inputs: dict) -> torch.Tensor:
        p = self.pairing
        kept, p.kept = p.kept, None
        if kept is not None:
            if pairs.matches(inputs, kept[0]):
                p.hits += 1
                return kept[1]
            p.misses += 1
            self._one_after_the_other("an uncond call differed from the one guessed")
        elif p.changes is None and p.first_cond is not None:
            self._learn(*p.first_cond, inputs)
        return self._run(inputs, 1)

    def _learn(self, cond: dict, cond_snapshot: dict, uncond: dict) -> None:
        p = self.pairing
        p.changes, p.first_cond = pairs.replacements(cond_snapshot, uncond), None
        try:
            pairs.join(uncond, cond, cond["hidden_states"].shape[0], self.family.shared, self.family.row_lists)
        except pairs.CannotJoin as exc:
            self._one_after_the_other(str(exc))

    def _one_after_the_other(self, reason: str) -> None:
        self.pairing.joinable = False
        if reason not in self._said:
            self._said.add(reason)
            log.info("Tandem: %s runs its cond and uncond calls one after the other (%s); each is still split "
                     "by rows", type(self._pipe()).__name__, reason)

    def _run(self, inputs: dict, branches: int) -> torch.Tensor:
        from ..runtime.calls import ModelCall

        t = inputs["timestep"]
        extras = {k: v for k, v in inputs.items() if k not in _CALL_INPUTS and v is not None}
        call = ModelCall(inputs["hidden_states"], t if isinstance(t, torch.Tensor) else torch.tensor(t),
                         inputs.get("encoder_hidden_states"), extras, branches=branches, index=self.calls,
                         shared=self.family.shared, row_lists=self.family.row_lists)
        self.calls += 1
        return self._executor(self.real, self.family.wire, call)
