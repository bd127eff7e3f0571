"""A setting declared once: its name, kind, range or choices, default and one line of help.

A strategy lists its own knobs (`Strategy.knobs`); the config's own settings are declared in `config.py`. The
CLI's options, the Settings node's inputs, the demo's controls, the config's checks and the plan's candidates
are all built from these declarations, so a new knob is written in one place. Imports nothing but
`validation` and `environment` (no processes, no UI library).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

from . import validation
from .environment import VARIABLES

KINDS = (int, float, bool, str)


@dataclass(frozen=True)
class Knob:
    """One setting.

    kind: int, float, bool or str. default: the value when it is not given (None only with `unset`).
    low, high: the range of a number (either may be None: unbounded). choices: the only values allowed.
    unset: None is a value, meaning "the strategy picks" (shown as 0 on the Settings node and in the demo).
    axis: for a mesh axis' degree (a name in some `Strategy.axes`), what the degree does, as a clause for the
      refusal of a strategy that lacks the axis ("they cut the model into stages").
    check: a check of its own, `check(name, value) -> value`, in place of the kind's (e.g. seconds > 0).
    variable: the TANDEM_* variable that gives its value when none is given (`environment.setting`).
    unset_means: with `unset`, what None stands for ("the strategy picks").
    label: the name a form shows, where not `name` (its value stays saved under `name`).
    """

    name: str
    kind: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    unset: bool = False
    axis: str = ""
    check: Callable[[str, Any], Any] | None = None
    variable: str = ""
    unset_means: str = "the strategy picks"  # what None (0 on a form) stands for, in the help
    label: str = ""  # what a form (the Settings node) names it, where not its name

    def __post_init__(self):
        if not self.name.isidentifier() or self.kind not in KINDS or "\n" in self.help:
            raise ValueError(f"knob {self.name!r}: a name like a Python identifier, a kind among int, float, bool, "
                             "str and one line of help")
        if self.default is not None or not self.unset:
            self.validate(self.default)

    def validate(self, value):
        """`value` checked against the declaration and normalised (an int for a whole number); raises
        TypeError or ValueError in one sentence naming the knob."""
        if value is None and self.unset:
            return None
        if self.check is not None:
            return self.check(self.name, value)
        if self.choices:
            if isinstance(value, bool) != (self.kind is bool) or value not in self.choices:
                raise ValueError(f"{self.name} must be {' or '.join(map(str, self.choices))}; got {value!r}")
            return self.kind(value)
        if self.kind is bool:
            return validation.flag(self.name, value)
        if self.kind is str:
            return validation.text(self.name, value)
        if self.kind is int:
            return validation.whole_number(self.name, value, int(self.low if self.low is not None else -2**63),
                                           None if self.high is None else int(self.high))
        return validation.finite_number(self.name, value, self.low, self.high)

    @property
    def option(self) -> str:
        """Its command-line option: --time-shift for time_shift."""
        return "--" + self.name.replace("_", "-")

    def widget(self) -> Widget:
        """How a form (the Settings node, the demo) shows it."""
        kind = "choice" if self.choices else self.kind.__name__
        default = self.default if self.default is not None else 0
        return Widget(self.name, kind, str(default) if self.choices else default, 0 if self.unset else self.low,
                      self.high, tuple(map(str, self.choices)), self.help + (f" (0: {self.unset_means})" if self.unset
                                                                             else ""), self.label)

    def from_widget(self, value):
        """A form's value as the config takes it: 0 -> None for `unset`, a choice's text -> its value."""
        if self.unset and value == 0:
            return None
        if self.choices and isinstance(value, str):
            return next((choice for choice in self.choices if str(choice) == value), value)
        return value


@dataclass(frozen=True)
class Widget:
    """A knob as a form shows it. kind: int, float, bool, str or choice (`options`, as text)."""

    name: str
    kind: str
    default: Any
    low: float | None
    high: float | None
    options: tuple[str, ...]
    tooltip: str
    label: str = ""  # what a form names it, where not its name


def add_options(parser, knobs) -> None:
    """An argparse option per knob (dest: its name; unset knobs default to None, "the strategy picks")."""
    for knob in knobs:
        if knob.kind is bool:
            action = argparse.BooleanOptionalAction if knob.default else "store_true"
            parser.add_argument(knob.option, dest=knob.name, action=action, default=knob.default, help=knob.help)
            continue
        parser.add_argument(knob.option, dest=knob.name, type=knob.kind, default=knob.default,
                            help=f"{knob.help} (default: {_default_text(knob)})")


def _default_text(knob: Knob) -> str:
    """What a knob's option is when not given: its default; else its TANDEM_* variable's value (and that one's
    default); else what the strategy picks."""
    if knob.default is not None:
        return str(knob.default)
    if knob.variable:
        fallback = VARIABLES[knob.variable].default
        return knob.variable + (f" or {fallback}" if fallback else "")
    return knob.unset_means
