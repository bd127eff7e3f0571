"""How each model family is called and cut. A family names an adapter; the engine never imports a host.

A family travels as a string: the adapter module's name, optionally followed by ':' and the model family it
serves (e.g. "comfy_dit:flux"), so workers know both how to call the model and what it is.
"""

from __future__ import annotations

import importlib
from typing import Callable

ADAPTERS = ("diffusers_unet", "comfy_unet", "comfy_dit", "diffusers_dit")


def adapter_name(family: str) -> str:
    """The adapter module serving `family` ("comfy_dit:flux" -> "comfy_dit")."""
    return family.split(":", 1)[0]


def adapter(family: str):
    """The adapter module serving `family`; ValueError naming the known ones for any other."""
    name = adapter_name(family)
    if name not in ADAPTERS:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(ADAPTERS)}")
    return importlib.import_module(f"{__name__}.{name}")


def forward_for_family(family: str) -> Callable:
    """The function `forward(module, call: ModelCall) -> Tensor` for a model family."""
    return adapter(family).forward


def attention_heads(family: str, module) -> int | None:
    """The attention heads of `module`, a model of `family`, where its adapter can tell (`attention_heads` in the
    adapter module): what a ulysses degree must divide; None where it cannot."""
    heads = getattr(adapter(family), "attention_heads", None)
    return None if heads is None else heads(module)


def sequence_refusal(family: str, call) -> str | None:
    """Why this call cannot have its token sequence split although its family can (a ControlNet's residuals,
    a mask the split cannot take ...), where the adapter can tell before the call (`sequence_refusal` in the
    adapter module); None: it can, or the adapter checks on the workers."""
    refuse = getattr(adapter(family), "sequence_refusal", None)
    return None if refuse is None else refuse(family, call)


def sequence_whole_rows(family: str, call) -> str | None:
    """Why this call runs on whole rows (cfg, batch) although its family can split its tokens, under auto and a
    named sequence strategy alike (a call of a model patch whose effect on a share of the tokens is unknown),
    where the adapter can tell (`sequence_whole_rows` in the adapter module); None: it can be split."""
    whole = getattr(adapter(family), "sequence_whole_rows", None)
    return None if whole is None else whole(family, call)


def sequence_runner(family: str) -> Callable | None:
    """The function `run(module, call, group) -> output` that runs a model of `family` with its token sequence
    split over a strategies.sequence group, or None where the family has none (yet)."""
    named = getattr(adapter(family), "family_named", None)
    if named is None or ":" not in family:
        return None
    return getattr(named(family), "sequence", None)


def attention_recorder(family: str) -> Callable | None:
    """The context `record_attention(call, recorder)` that yields `call` with its attentions timed
    (models/attention_timing.py), or None where the family's adapter has none."""
    return getattr(adapter(family), "record_attention", None)
