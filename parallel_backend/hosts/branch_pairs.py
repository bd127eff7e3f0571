"""A guided step's two model calls, cond then uncond, run as one call of [uncond; cond] rows. Pure functions.

Flux (true CFG), Qwen-Image and Wan call their transformer twice per step: the cond call, then the uncond
call with the same latents and timestep and other text inputs, and use neither result before both are made.
The host learns, from a job's first pair, which inputs the uncond call replaces (`replacements`); from then on
at a cond call it guesses the uncond call (`guess`), runs both as one call (`join`) that the cfg strategy
splits over two devices, and hands out the kept uncond rows only if the real uncond call `matches` the guess,
so the output is exactly that of the two calls made one at a time.

Inputs are keyword dicts, name -> value. A snapshot keeps containers as they were (a pipeline may change a dict
in place between the two calls) and tensors with their version counter (which in-place writes advance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REMOVED = object()  # a replacement meaning: the uncond call lacks this input


class CannotJoin(ValueError):
    """The two calls' inputs cannot be stacked into one call (the message says which input and why)."""


@dataclass(frozen=True)
class _Frozen:
    tensor: torch.Tensor
    version: int


def snapshot(value):
    """`value` as it is now, for a later `same`: containers copied, tensors pinned to their version."""
    if isinstance(value, torch.Tensor):
        return _Frozen(value, value._version)
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(snapshot(v) for v in value)
    return value


def same(actual, expected) -> bool:
    """Whether `actual` equals `expected` (a value or a snapshot): tensors the same object or torch.equal,
    containers element by element, anything else by ==."""
    if isinstance(expected, _Frozen):
        if expected.tensor._version != expected.version:  # written in place since: its snapshot is gone
            return False
        expected = expected.tensor
    if isinstance(expected, torch.Tensor) or isinstance(actual, torch.Tensor):
        return (isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor)
                and (actual is expected or (actual.shape == expected.shape and actual.dtype == expected.dtype
                                            and torch.equal(actual, expected.to(actual.device)))))
    if isinstance(expected, dict):
        return isinstance(actual, dict) and actual.keys() == expected.keys() and all(
            same(actual[k], expected[k]) for k in expected)
    if type(expected) in (list, tuple):
        return type(actual) is type(expected) and len(actual) == len(expected) and all(
            same(a, e) for a, e in zip(actual, expected))
    try:
        return actual is expected or bool(actual == expected)
    except Exception:  # an == without a single truth value (arrays): not provably equal
        return False


def replacements(cond: dict, uncond: dict) -> dict:
    """The inputs by which `uncond` differs from `cond` (a snapshot or live inputs): name -> uncond's value,
    or REMOVED where uncond lacks the input."""
    changed = {name: value for name, value in uncond.items() if name not in cond or not same(value, cond[name])}
    return changed | {name: REMOVED for name in cond.keys() - uncond.keys()}


def guess(cond: dict, changes: dict) -> dict:
    """The uncond call expected after the cond call `cond`, given the learned `changes`."""
    return {name: value for name, value in (cond | changes).items() if value is not REMOVED}


def matches(actual: dict, expected: dict) -> bool:
    """Whether the call `actual` has exactly the inputs of `expected` (a snapshot or live inputs)."""
    return actual.keys() == expected.keys() and all(same(actual[k], expected[k]) for k in expected)


def _per_row(value, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows


def join(uncond: dict, cond: dict, rows: int, shared=frozenset(), row_lists=frozenset()) -> dict:
    """One call whose 2 * rows rows are [uncond; cond]: per-row tensors and per-row lists stacked, every other
    input (the family's `shared` ones, non-tensors) equal in both and passed once. Raises CannotJoin."""
    if uncond.keys() != cond.keys():
        names = ", ".join(sorted(uncond.keys() ^ cond.keys()))
        raise CannotJoin(f"one branch alone passes {names}")
    joined = {}
    for name, c in cond.items():
        u = uncond[name]
        if name in row_lists and type(c) in (list, tuple) and len(c) == rows:
            if type(u) is not type(c) or len(u) != rows:
                raise CannotJoin(f"{name} is per row in one branch only")
            joined[name] = u + c
        elif name not in shared and (_per_row(c, rows) or _per_row(u, rows)):
            if not (_per_row(c, rows) and _per_row(u, rows) and u.shape == c.shape and u.dtype == c.dtype):
                raise CannotJoin(f"{name} has shape {_shape(u)} in the uncond branch and {_shape(c)} in the cond one")
            joined[name] = torch.cat([u, c.to(u.device)])
        elif same(u, c):
            joined[name] = c
        else:
            raise CannotJoin(f"{name} differs between the branches and is not per row")
    return joined


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
