"""The pool-wide settings a host may choose, declared once: WorkerPool checks its arguments against them and a
ParallelConfig carries them (`pool_options`). One not given is its TANDEM_* variable's (runtime/environment.py,
which holds the defaults), so ComfyUI, whose pool has no config, sets them through the environment.
`check_environment` checks every TANDEM_* variable at once, by the rule each is declared with."""

from __future__ import annotations

from . import environment, validation
from .deadlines import SILENT_S
from .knobs import Knob


def _hang_factor(name: str, value) -> float:
    return validation.finite_number(name, value, 1.0)  # under 1: a call as slow as usual counts as hung


def _hang_floor(name: str, value) -> float:
    # A worker renews its heartbeat twice a second; one silent for the floor counts as frozen, so a floor under
    # SILENT_S calls every busy worker frozen.
    return validation.finite_number(name, value, SILENT_S)


SECRET_FILE = Knob("secret_file", str, None, "devices on other machines: the shared secret file their `tandem worker "
                   "serve` reads", unset=True, variable="TANDEM_SECRET_FILE")
INTERFACE = Knob("interface", str, None, "devices on other machines: this machine's network interface that reaches "
                 "them, the only one the pool listens on", unset=True,
                 variable="TANDEM_INTERFACE")
ALLOW_MISSING_MACHINES = Knob("allow_missing_machines", bool, None, "devices on other machines: start the pool "
                              "without a machine that cannot be reached or refuses the secret, with a warning "
                              "(otherwise the start fails naming it)", unset=True,
                              variable="TANDEM_ALLOW_MISSING_MACHINES", unset_means="no")
HANG_FACTOR = Knob("hang_factor", float, None, "a timed kind of call is hung after this many times its median (at "
                   "least 1)", unset=True, check=_hang_factor, variable="TANDEM_HANG_FACTOR")
HANG_FLOOR_S = Knob("hang_floor_s", float, None, f"... and after at least this many seconds (at least {SILENT_S:g}: a "
                    "worker's heartbeat may be that late)", unset=True, check=_hang_floor,
                    variable="TANDEM_HANG_FLOOR_S")
MAX_MODELS = Knob("max_models", int, None, "models kept loaded on the workers at once", low=1, unset=True, variable="TANDEM_MAX_MODELS")
POOL_SETTINGS = (SECRET_FILE, INTERFACE, ALLOW_MISSING_MACHINES, HANG_FACTOR, HANG_FLOOR_S, MAX_MODELS)


def devices_variable() -> tuple[str, ...]:
    """The devices TANDEM_DEVICES names (parsed: runtime/devices.py); a refusal names the variable."""
    from .devices import parse_devices

    value = environment.text("TANDEM_DEVICES")
    try:
        return parse_devices(value)
    except ValueError as exc:
        raise ValueError(f"TANDEM_DEVICES={value!r}: {exc}") from None


def check_environment() -> None:
    """Every TANDEM_* variable that is set, checked before any work: by the rule declared with it
    (environment.py), by its Knob for a pool setting, TANDEM_DEVICES as devices and TANDEM_TEST_SLOWDOWN as a
    slowdown (slowdown.py). Raises ValueError in one sentence naming the first variable refused."""
    from . import slowdown

    for name in environment.VARIABLES:
        environment.check(name)
    for knob in POOL_SETTINGS:
        environment.setting(knob, None)
    devices_variable()
    try:
        slowdown.from_environment()
    except ValueError as exc:
        raise ValueError(f"{slowdown.ENV}={environment.text(slowdown.ENV)!r}: {exc}") from None
