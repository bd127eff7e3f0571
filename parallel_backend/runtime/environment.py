"""Every TANDEM_* environment variable, with its default, meaning and rule: read here and nowhere else.

A variable's rule is declared with it (`choices`, the least value `low` of a number, a `pattern`), or, for a
pool setting, by its Knob (runtime/pool_settings.py, whose `check_environment` checks every variable at once:
the CLI before any work, the ComfyUI pack as it loads). Every refusal is one sentence naming the variable.

The README's table "Environment variables" lists the same ones (tests/test_settings_declared_once.py checks
it). An argument always wins over a variable; nothing in the package writes os.environ to pass a setting
(the pool hands TANDEM_AUTHKEY to each worker in the worker's own environment, never in its own).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Variable:
    name: str
    default: str  # "" : not set
    meaning: str  # one line, for the README's table
    choices: tuple[str, ...] = ()  # the only values it takes
    low: float | None = None  # a number (`number`) of at least this; seconds where the name ends in _S
    pattern: str = ""  # a regular expression the whole value matches, said in `form`
    form: str = ""


VARIABLES = {v.name: v for v in (
    Variable("TANDEM_DEVICES", "auto", "ComfyUI: the pack's devices, and what a Settings node's `auto` means "
             "(`auto`: every GPU)"),
    Variable("TANDEM_POOL_START", "on_load", "ComfyUI: when the pool starts: `on_load`, `on_first_use` or `off`",
             choices=("on_load", "on_first_use", "off")),
    Variable("TANDEM_HANG_FACTOR", "10", "a timed kind of call is hung after this many times its median, "
             "at least 1 (`WorkerPool(hang_factor=)` wins)"),
    Variable("TANDEM_HANG_FLOOR_S", "20", "... and after at least this many seconds, at least 2 (a worker's "
             "heartbeat may be that late; `hang_floor_s=`)"),
    Variable("TANDEM_MAX_MODELS", "2", "models kept loaded on the workers at once (`max_models=`)"),
    Variable("TANDEM_SECRET_FILE", "", "devices on other machines: the shared secret file (`--secret-file`, "
             "`secret_file=` win)"),
    Variable("TANDEM_INTERFACE", "", "devices on other machines: the network interface that reaches them "
             "(`--interface`, `interface=` win)"),
    Variable("TANDEM_ALLOW_MISSING_MACHINES", "0", "`1`: a pool starts without another machine that cannot be "
             "reached or refuses the secret, with a warning (`--allow-missing-machines`, `allow_missing_machines=` "
             "win); `0`: its start fails naming it", choices=("0", "1")),
    Variable("TANDEM_REJOIN_S", "30", "the least seconds between two attempts to reach a machine left out", low=0),
    Variable("TANDEM_LINK_TIMEOUT_S", "6", "seconds of silence after which the other end of a host-daemon "
             "connection counts as gone (at least 1: two of the daemon's status periods)", low=1),
    Variable("TANDEM_FORK_WORKERS", "1", "`0`: start each CPU worker as an interpreter of its own instead of forking "
             "it from the preloaded launcher (Linux only; runtime/launcher.py)", choices=("0", "1")),
    Variable("TANDEM_AUTHKEY", "", "set by the pool in each worker's environment, taken (and removed) by the "
             "worker: the key it authenticates with; not for users", pattern="(?:[0-9a-fA-F]{2})+",
             form="hexadecimal digits (the pool sets it for its workers: leave it unset)"),
    Variable("TANDEM_STRICT_P2P", "", "`1`: each worker makes gloo pair sends and receives in issue order, as "
             "NCCL does (the tests set it)", choices=("0", "1")),
    Variable("TANDEM_TEST_SLOWDOWN", "", "tests only: `RANK:FACTOR` (e.g. `1:2`), a worker repeats its heavy "
             "compute, a stand-in for a slower card (`test_slowdown=` wins)"),
    Variable("TANDEM_TEST_PACKS", "", "tests/comfy only: the folder of other custom-node packs for the "
             "coexistence tests (skipped without it)"),
)}


def text(name: str) -> str:
    """The variable's value, stripped; its default when it is unset or blank."""
    return os.environ.get(name, "").strip() or VARIABLES[name].default


def _refused(name: str, value: str, rule: str) -> ValueError:
    return ValueError(f"{name}={value!r} {rule}")


def number(name: str, kind: type = float):
    """The variable as a number of `kind` (int or float), at least its `low`; one sentence naming it when it is
    not one."""
    value = text(name)
    try:
        parsed = kind(value)
    except ValueError:
        raise _refused(name, value, f"is not a valid {'whole ' if kind is int else ''}number") from None
    low = VARIABLES[name].low
    if low is not None and not parsed >= low:  # nan too
        raise _refused(name, value, f"must be {low:g} or more{' seconds' if name.endswith('_S') else ''}")
    return parsed


def check(name: str) -> str:
    """The variable's text, checked against the rule declared with it (a variable a Knob reads is checked by
    `setting`); raises ValueError in one sentence naming it."""
    variable, value = VARIABLES[name], text(name)
    if not value:
        return value
    if variable.choices and value not in variable.choices:
        raise _refused(name, value, f"is not one of: {', '.join(variable.choices)}")
    if variable.low is not None:
        number(name)
    if variable.pattern and not re.fullmatch(variable.pattern, value):
        raise _refused(name, value, f"must be {variable.form}")
    return value


def setting(knob, value):
    """`value` checked against `knob` (runtime/knobs.py); where it is None, the knob's variable (None when that is
    unset too)."""
    if value is not None or not knob.variable:
        return knob.validate(value)
    raw = text(knob.variable)
    if not raw:
        return None
    if knob.kind is bool:  # a flag's variable is 0 or 1 (its `choices`), refused naming it otherwise
        return check(knob.variable) == "1"
    try:
        return knob.validate(raw if knob.kind is str else number(knob.variable, knob.kind))
    except (TypeError, ValueError) as exc:
        if str(exc).startswith(knob.variable):
            raise
        raise ValueError(f"{knob.variable}={raw!r}: {exc}") from None


def take(name: str) -> str:
    """The variable's value, removed from this process's environment (a secret a child process is handed)."""
    return os.environ.pop(name, "") or VARIABLES[name].default
