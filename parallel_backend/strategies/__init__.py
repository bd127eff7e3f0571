"""Strategies: how one model call is shared among devices. One module per strategy, one interface
(`base.Strategy`), one registry by name. Registering a strategy here makes it a choice of the config, the
CLI, the bench, the demo and the ComfyUI Settings node; nothing else names it.

Row strategies (cfg, batch) give each device a contiguous share of the call's rows and compose as the outer
axes of the mesh. A strategy with inner axes (asyncdiff: stages; usp: ring x ulysses) runs each row share on a
group of devices.
"""

from __future__ import annotations

from .base import Strategy

_REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Adds `strategy` under its name (a name already taken by another strategy is refused)."""
    if not strategy.name or strategy.name == "auto":
        raise ValueError(f"a strategy needs a name other than 'auto'; got {strategy.name!r}")
    if _REGISTRY.get(strategy.name, strategy) is not strategy:
        raise ValueError(f"strategy {strategy.name!r} is registered already")
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


def worker_handlers() -> dict:
    """Message type -> worker function, for every registered strategy's own messages."""
    handlers: dict = {}
    for strategy in _REGISTRY.values():
        handlers.update(strategy.worker_handlers())
    return handlers


def _register_builtins() -> None:
    from . import asyncdiff, batch, cfg, ring, ulysses, usp

    for module in (cfg, batch, asyncdiff, ulysses, ring, usp):
        register(module.STRATEGY)


_register_builtins()
