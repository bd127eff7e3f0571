"""The pool-wide settings a host may choose, declared once: WorkerPool checks its arguments against them and a
ParallelConfig carries them (`pool_options`). One not given is its TANDEM_* variable's (runtime/environment.py,
which holds the defaults), so ComfyUI, whose pool has no config, sets them through the environment."""

from __future__ import annotations

from . import validation
from .knobs import Knob

SECRET_FILE = Knob("secret_file", str, None, "devices on other machines: the shared secret file their `tandem worker "
                   "serve` reads", unset=True, variable="TANDEM_SECRET_FILE")
INTERFACE = Knob("interface", str, None, "devices on other machines: this machine's network interface that reaches "
                 "them, the only one the pool listens on", unset=True,
                 variable="TANDEM_INTERFACE")
HANG_FACTOR = Knob("hang_factor", float, None, "a timed kind of call is hung after this many times its median", unset=True, check=validation.positive,
                   variable="TANDEM_HANG_FACTOR")
HANG_FLOOR_S = Knob("hang_floor_s", float, None, "... and after at least this many seconds", unset=True, check=validation.seconds, variable="TANDEM_HANG_FLOOR_S")
MAX_MODELS = Knob("max_models", int, None, "models kept loaded on the workers at once", low=1, unset=True, variable="TANDEM_MAX_MODELS")
POOL_SETTINGS = (SECRET_FILE, INTERFACE, HANG_FACTOR, HANG_FLOOR_S, MAX_MODELS)
