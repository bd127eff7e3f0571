"""Every TANDEM_* environment variable, with its default and meaning: read here and nowhere else.

The README's table "Environment variables" lists the same ones (tests/test_settings_declared_once.py checks
it). An argument always wins over a variable; nothing in the package writes os.environ to pass a setting
(the pool hands TANDEM_AUTHKEY to each worker in the worker's own environment, never in its own).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Variable:
    name: str
    default: str  # "" : not set
    meaning: str  # one line, for the README's table


VARIABLES = {v.name: v for v in (
    Variable("TANDEM_DEVICES", "auto", "ComfyUI: the pack's devices, and what a Settings node's `auto` means "
             "(`auto`: every GPU)"),
    Variable("TANDEM_POOL_START", "on_load", "ComfyUI: when the pool starts: `on_load`, `on_first_use` or `off`"),
    Variable("TANDEM_HANG_FACTOR", "10", "a timed kind of call is hung after this many times its median "
             "(`WorkerPool(hang_factor=)` wins)"),
    Variable("TANDEM_HANG_FLOOR_S", "20", "... and after at least this many seconds (`hang_floor_s=`)"),
    Variable("TANDEM_MAX_MODELS", "2", "models kept loaded on the workers at once (`max_models=`)"),
    Variable("TANDEM_SECRET_FILE", "", "devices on other machines: the shared secret file (`--secret-file`, "
             "`secret_file=` win)"),
    Variable("TANDEM_INTERFACE", "", "devices on other machines: the network interface that reaches them "
             "(`--interface`, `interface=` win)"),
    Variable("TANDEM_REJOIN_S", "30", "the least seconds between two attempts to reach a machine left out"),
    Variable("TANDEM_LINK_TIMEOUT_S", "6", "seconds of silence after which the other end of a host-daemon "
             "connection counts as gone"),
    Variable("TANDEM_FORK_WORKERS", "1", "`0`: start each CPU worker as an interpreter of its own instead of forking "
             "it from the preloaded launcher (Linux only; runtime/launcher.py)"),
    Variable("TANDEM_AUTHKEY", "", "set by the pool in each worker's environment, taken (and removed) by the "
             "worker: the key it authenticates with; not for users"),
    Variable("TANDEM_STRICT_P2P", "", "`1`: each worker makes gloo pair sends and receives in issue order, as "
             "NCCL does (the tests set it)"),
    Variable("TANDEM_TEST_SLOWDOWN", "", "tests only: `RANK:FACTOR` (e.g. `1:2`), a worker repeats its heavy "
             "compute, a stand-in for a slower card (`test_slowdown=` wins)"),
    Variable("TANDEM_TEST_PACKS", "", "tests/comfy only: the folder of other custom-node packs for the "
             "coexistence tests (skipped without it)"),
)}


def text(name: str) -> str:
    """The variable's value, stripped; its default when it is unset or blank."""
    return os.environ.get(name, "").strip() or VARIABLES[name].default


def number(name: str, kind: type = float):
    """The variable as a number of `kind` (int or float); one sentence naming it when it is not one."""
    value = text(name)
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a valid {'whole ' if kind is int else ''}number") from None


def setting(knob, value):
    """`value` checked against `knob` (runtime/knobs.py); where it is None, the knob's variable (None when that is
    unset too)."""
    if value is not None or not knob.variable:
        return knob.validate(value)
    raw = text(knob.variable)
    if not raw:
        return None
    try:
        return knob.validate(raw if knob.kind is str else number(knob.variable, knob.kind))
    except (TypeError, ValueError) as exc:
        if str(exc).startswith(knob.variable):
            raise
        raise ValueError(f"{knob.variable}={raw!r}: {exc}") from None


def take(name: str) -> str:
    """The variable's value, removed from this process's environment (a secret a child process is handed)."""
    return os.environ.pop(name, "") or VARIABLES[name].default
