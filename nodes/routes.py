"""HTTP routes of the pack: GET /tandem/status (pool devices and state, the last run's per-call times)."""

from __future__ import annotations

from aiohttp import web

from .runtime import RUNTIME


def register() -> None:
    from server import PromptServer

    @PromptServer.instance.routes.get("/tandem/status")
    async def tandem_status(request):
        return web.json_response(RUNTIME.status())
