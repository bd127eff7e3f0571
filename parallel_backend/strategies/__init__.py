"""Strategies: how one model call is shared among devices. One module per strategy, one interface
(`base.Strategy`), one registry by name. Registering a strategy here makes it a choice of the config, the
CLI, the bench, the demo and the ComfyUI Settings node; nothing else names it.

Each strategy declares its knobs (`Strategy.knobs`); `knobs()` is every registered one, in registration order,
which the CLI options, the Settings node's inputs and the demo's controls follow.

Row strategies (cfg, batch) give each device a contiguous share of the call's rows and compose as the outer
axes of the mesh. A strategy with inner axes (asyncdiff: stages; usp: ring x ulysses) runs each row share on a
group of devices.
"""

from __future__ import annotations

from ..runtime.knobs import Knob
from .base import Strategy

_REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Adds `strategy` under its name (a name already taken by another strategy is refused)."""
    if not strategy.name or strategy.name == "auto":
        raise ValueError(f"a strategy needs a name other than 'auto'; got {strategy.name!r}")
    if _REGISTRY.get(strategy.name, strategy) is not strategy:
        raise ValueError(f"strategy {strategy.name!r} is registered already")
    _check_knobs(strategy)
    _REGISTRY[strategy.name] = strategy
    return strategy


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """Registered strategy names, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> Strategy:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of: auto, {', '.join(_REGISTRY)}") from None


def _check_knobs(strategy: Strategy) -> None:
    """Each axis has an int knob of its name marked `axis`; a knob another strategy declares too is the same."""
    own = {knob.name: knob for knob in strategy.knobs}
    for axis in strategy.axes:
        knob = own.get(axis)
        if knob is None or knob.kind is not int or not knob.axis or not knob.unset:
            raise ValueError(f"strategy {strategy.name!r}: axis {axis!r} needs a knob of that name (int, unset "
                             "allowed, with its `axis` clause)")
    for knob in strategy.knobs:
        if knob.axis and knob.name not in strategy.axes:
            raise ValueError(f"strategy {strategy.name!r}: knob {knob.name!r} is an axis; list it in `axes`")
        other = next((k for k in knobs() if k.name == knob.name), knob)
        if other != knob:
            raise ValueError(f"strategy {strategy.name!r}: knob {knob.name!r} differs from the one of that name "
                             "another strategy declares; share that declaration")


def knobs() -> tuple[Knob, ...]:
    """Every registered strategy's knobs, each once, in registration order (new ones come last, as the Settings
    node needs: saved workflows keep widget values in input order)."""
    seen: dict[str, Knob] = {}
    for strategy in _REGISTRY.values():
        for knob in strategy.knobs:
            seen.setdefault(knob.name, knob)
    return tuple(seen.values())


def builtin_knobs() -> tuple[Knob, ...]:
    """The knobs of the package's first strategies (`_register_builtins`), which forms show before the memory
    settings; the package's newer strategies' knobs and any other's come after those (config.form_knobs)."""
    return knobs()[:_BUILTIN_KNOBS]


def knob(name: str) -> Knob | None:
    """The registered knob called `name` (None: no strategy declares one)."""
    return next((k for k in knobs() if k.name == name), None)


def users(name: str, axes_only: bool = False) -> tuple[str, ...]:
    """The strategies that declare knob `name` (with `axes_only`: as an axis)."""
    return tuple(s.name for s in _REGISTRY.values()
                 if any(k.name == name for k in s.knobs) and (not axes_only or name in s.axes))


def worker_handlers() -> dict:
    """Message type -> worker function, for every registered strategy's own messages."""
    handlers: dict = {}
    for strategy in _REGISTRY.values():
        handlers.update(strategy.worker_handlers())
    return handlers


def worker_cutters() -> dict:
    """Strategy name -> its cut_on_load, for the strategies that hold a model cut (messages.Load.cut)."""
    return {s.name: s.cut_on_load for s in _REGISTRY.values() if s.cut_on_load is not None}


def _register_builtins() -> None:
    from . import asyncdiff, batch, cfg, patch, pipefusion, ring, tensor, ulysses, usp

    for module in (cfg, batch, asyncdiff, ulysses, ring, usp, tensor):
        register(module.STRATEGY)
    global _BUILTIN_KNOBS
    _BUILTIN_KNOBS = len(knobs())
    for module in (patch, pipefusion):  # after the forms' memory inputs: saved workflows keep widget values in order
        register(module.STRATEGY)


_BUILTIN_KNOBS = 0
_register_builtins()
