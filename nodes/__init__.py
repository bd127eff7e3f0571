"""ComfyUI nodes of the Tandem pack (V3 API). Thin: they install Tandem's wrappers and call the stock samplers."""

from __future__ import annotations

import threading
from pathlib import Path

from comfy_api.latest import ComfyExtension

from .model import TandemModel
from .runtime import RUNTIME
from .samplers import TandemKSampler, TandemKSamplerAdvanced
from .settings import TandemSettings
from .vae import TandemVAEDecode, TandemVAEEncode
from .vae_tiled import TandemVAEDecodeTiled

NODES = [TandemKSampler, TandemKSamplerAdvanced, TandemSettings, TandemModel, TandemVAEDecode, TandemVAEEncode,
         TandemVAEDecodeTiled]
_activated = threading.Event()


def activate() -> None:
    """Registers the routes and starts the pool in the background. Once per process, however often called:
    ComfyUI v0.8 calls the entry point but not `on_load`; newer versions may call both."""
    if _activated.is_set():
        return
    _activated.set()
    from parallel_backend.runtime.pool_files import install_sigterm_cleanup

    from . import routes

    install_sigterm_cleanup()  # from ComfyUI's main thread: a SIGTERM leaves no worker or pool file behind
    # ComfyUI serves web/ at /extensions/<the pack's folder name>/ (the folder as installed, links unresolved).
    routes.register(Path(__file__).parent.parent.name)
    RUNTIME.start_on_load()


class TandemExtension(ComfyExtension):
    async def on_load(self) -> None:
        activate()

    async def get_node_list(self):
        return NODES
