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
    assert "Tandem" in dom and "cpu #0" in dom and "cpu #1" in dom and "device utilisation" in dom, dom[-2000:]
    assert "running" in dom
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", comfy_server.url + "/tandem/panel"],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 2000
    (comfy_server.base / "tandem_panel.png").write_bytes(shot.read_bytes())  # kept with the server's files


def _webdriver():
    """selenium's webdriver module; skips the test, before any work, where selenium or the browser is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    if CHROMIUM is None or shutil.which("chromedriver") is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    return webdriver


def _browser(webdriver, tmp_path):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def test_sidebar_tab_inside_comfyui_shows_the_pool(comfy_server, comfy, tmp_path):
    webdriver = _webdriver()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    comfy.run_pair(comfy_server, "for_tab", "cfg")
    browser = _browser(webdriver, tmp_path)
    try:
        browser.get(comfy_server.url + "/")
        wait = WebDriverWait(browser, 90)
        icon = wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, ".pi-server")))
        for mask in browser.find_elements(By.CSS_SELECTOR, ".p-dialog-mask"):  # a first-start dialog (templates)
            browser.execute_script("arguments[0].remove()", mask)
        browser.execute_script("arguments[0].closest('button').click()", icon)
        panel = wait.until(ready.visibility_of_element_located((By.CSS_SELECTOR, ".tandem-panel")))
        wait.until(lambda _: "device utilisation" in panel.text)
        text = panel.text
        shot = tmp_path / "tandem_sidebar_tab.png"
        browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    assert "cpu #0" in text and "cpu #1" in text and "running" in text and "MiB peak" in text, text
    assert "MiB weights" in text, text  # what each worker holds of the model (whole, cut or sharded)
    assert shot.stat().st_size > 10000
    (comfy_server.base / "tandem_sidebar_tab.png").write_bytes(shot.read_bytes())
    print(f"screenshot: {shot}")
