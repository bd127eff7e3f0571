"""The web panel in a real headless browser: the status route feeds it, and it shows the pool and last run."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_frontend_extension_is_served(comfy_server):
    extensions = comfy_server.get("/extensions")
    assert any(e.endswith("/tandem.js") for e in extensions), extensions
    with urllib.request.urlopen(comfy_server.url + "/extensions/tandem/tandem_panel.js", timeout=30) as response:
        assert b"export function renderStatus" in response.read()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_panel_screenshot_shows_devices_and_last_run(comfy_server, comfy, tmp_path):
    comfy.run_pair(comfy_server, "for_panel", "cfg")
    shot = tmp_path / "tandem_panel.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--window-size=520,420", "--virtual-time-budget=4000"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", comfy_server.url + "/tandem/panel"], capture_output=True,
                         text=True, timeout=120).stdout
    assert "Tandem" in dom and "cpu #0" in dom and "cpu #1" in dom and "estimated speed-up" in dom, dom[-2000:]
    assert "running" in dom
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", comfy_server.url + "/tandem/panel"],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 2000
    (comfy_server.base / "tandem_panel.png").write_bytes(shot.read_bytes())  # kept with the server's files
