"""HTTP routes of the pack: GET /tandem/status (pool devices and state, the last run's per-call times)."""

from __future__ import annotations

from aiohttp import web

from .runtime import RUNTIME


PANEL_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Tandem</title></head>
<body style="background:#202020;margin:0"><div id="panel"></div>
<script type="module">
import {{ mountPanel }} from "/extensions/{pack}/tandem_panel.js";
mountPanel(document.getElementById("panel"));
</script></body></html>"""


def register(pack_name: str) -> None:
    """pack_name: the pack's folder in custom_nodes/, under which ComfyUI serves web/ at /extensions/."""
    from server import PromptServer

    @PromptServer.instance.routes.get("/tandem/status")
    async def tandem_status(request):
        return web.json_response(RUNTIME.status())

    @PromptServer.instance.routes.get("/tandem/panel")
    async def tandem_panel(request):
        return web.Response(text=PANEL_PAGE.format(pack=pack_name), content_type="text/html")
