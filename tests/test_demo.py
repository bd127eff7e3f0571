"""`tandem demo`: the app's functions against the one-device oracle, the served app through gradio_client, and
one real page in headless Chromium (skipped where Chromium or chromedriver is missing)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time

import numpy as np
import pytest

pytest.importorskip("gradio")

from parallel_backend.demo.app import build_app, generate_handler, launch, readable  # noqa: E402
from parallel_backend.demo.bench_view import bench_figure, load_report, psnr_text, report_table  # noqa: E402
from parallel_backend.demo.session import DemoSession, generate_pair, pool_status  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 4
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def session():
    session = DemoSession()
    yield session
    session.shutdown()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not a running worker
        return f.read().split(")")[-1].split()[0] != "Z"


def test_cfg_matches_one_device(session):
    result = generate_pair(session, "a handwritten 3", steps=STEPS, cfg=4.0, seed=5, devices="cpu:2", strategy="cfg")
    assert (result.single.latents - result.tandem.latents).abs().max().item() <= 1e-4
    assert result.max_abs_diff <= 1  # pixels: at most a rounding step
    assert result.tandem.model_calls == result.single.model_calls == STEPS
    # the reported speed-up is the two runs' measured time per call, one over the other (not a timing test)
    assert result.speedup == pytest.approx((result.single.seconds / STEPS) / (result.tandem.seconds / STEPS))
    assert result.devices == ("cpu", "cpu")
    assert "per model call" in result.summary() and "(cfg is exact)" in result.summary() and result.exact


def test_asyncdiff_with_full_warmup_is_exact_and_without_is_close(session):
    exact = generate_pair(session, "a handwritten 8", steps=STEPS, cfg=4.0, devices="cpu:2", strategy="asyncdiff",
                          warmup=STEPS)
    assert (exact.single.latents - exact.tandem.latents).abs().max().item() <= 1e-4
    approx = generate_pair(session, "a handwritten 8", steps=STEPS, cfg=4.0, devices="cpu:2", strategy="asyncdiff",
                           warmup=1, stride=1, time_shift=True)
    # stale by one call after one exact step of 4: close to one device, not equal (measured: 28.5 dB)
    assert 20 <= approx.psnr_db < float("inf")
    a, b = (np.asarray(image.convert("RGB"), dtype=np.float64) for image in (approx.single.images[0],
                                                                              approx.tandem.images[0]))
    assert approx.psnr_db == pytest.approx(10 * np.log10(255 ** 2 / np.mean((a - b) ** 2)), abs=0.01)
    assert not approx.exact and not exact.exact  # the strategy is approximate, whatever this run's warm-up
    assert (f"Difference against one device: max abs diff {approx.max_abs_diff:.0f}/255, PSNR {approx.psnr_db:.1f} dB "
            "(asyncdiff is approximate after its warm-up steps" in approx.summary())
    assert approx.speedup == pytest.approx((approx.single.seconds / STEPS) / (approx.tandem.seconds / STEPS))
    assert approx.difference.size == approx.single.images[0].size


@pytest.mark.parametrize("devices, strategy, cfg, expected", [
    ("gpu:9", "cfg", 4.0, "not understood"),
    ("cpu:2", "cfg", 1.0, "cfg > 1"),
    ("cpu:2", "fastest", 4.0, "unknown strategy"),
])
def test_bad_input_is_a_readable_error(session, devices, strategy, cfg, expected):
    import gradio as gr

    with pytest.raises(ValueError) as caught:
        generate_pair(session, "a handwritten 1", steps=STEPS, cfg=cfg, devices=devices, strategy=strategy)
    assert expected in readable(caught.value)
    handler = generate_handler(session)
    with pytest.raises(gr.Error) as shown:
        handler("a handwritten 1", "", STEPS, cfg, 0, "euler", devices, strategy, 0, 1, 1, False,
                progress=lambda *a, **k: None)
    assert expected in shown.value.message and "Traceback" not in shown.value.message


def test_pool_status_and_restart(session):
    session.pool_for("cpu:2")
    text = pool_status(session)
    old = session.pool.worker_pids()
    assert "started on cpu, cpu" in text and all(str(pid) in text for pid in old)
    session.restart()
    assert session.pool.started and set(session.pool.worker_pids()).isdisjoint(old)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in old) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in old)


REPORT = {"model": "tiny", "resolution": [32, 32], "steps": 2, "devices": ["cpu", "cpu"], "threads_per_device": 1,
          "results": [{"strategy": "serial", "devices": 1, "speedup_vs_serial": 1.0, "ideal_speedup": 1.0},
                      {"strategy": "cfg", "devices": 2, "speedup_vs_serial": 1.6, "ideal_speedup": 1.9},
                      {"strategy": "serial", "devices": 1, "speedup_vs_serial": 1.0, "ideal_speedup": 1.0},
                      {"strategy": "batch", "devices": 2, "speedup_vs_serial": 1.4, "ideal_speedup": 1.8}]}


def test_bench_figure_from_saved_json(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(REPORT))
    frame = bench_figure(load_report(str(path)))
    assert list(frame["strategy"]) == ["cfg", "batch"]
    assert list(frame["speedup"]) == [1.6, 1.4]
    assert list(frame["psnr"]) == ["not computed"] * 2  # a report saved without it says so
    assert "PSNR against one device not computed" in report_table(REPORT)
    (tmp_path / "bad.json").write_text("{\"results\": 3}")
    with pytest.raises(ValueError, match="not a tandem bench report"):
        load_report(str(tmp_path / "bad.json"))


def test_the_bench_view_shows_each_rows_psnr_against_one_device(tmp_path):
    """As the bench measured it (a JSON report round trip: identical latents are written as Infinity)."""
    results = [{**row, "psnr_vs_serial_db": psnr} for row, psnr in zip(REPORT["results"],
                                                                        [float("inf"), 31.24, float("inf"), 98.1])]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({**REPORT, "results": results}))
    report = load_report(str(path))
    assert list(bench_figure(report)["psnr"]) == ["31.2 dB", "98.1 dB"]
    assert "batch      1.40x (ideal 1.80x), PSNR against one device 98.1 dB" in report_table(report)
    assert psnr_text(results[0]) == "identical"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(session):
    demo = build_app(session)
    port = _free_port()
    launch(demo, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_served_app_generates_two_images(served):
    from gradio_client import Client
    from PIL import Image

    client = Client(served, verbose=False)
    single, tandem, difference, summary = client.predict(
        "a handwritten 2", "", STEPS, 4.0, 0, "euler", "cpu:2", "cfg", 0, 1, 1, False, api_name="/generate")
    assert Image.open(single).size == Image.open(tandem).size == (256, 256)
    assert "per model call" in summary and "identical pixels" in summary
    with pytest.raises(Exception) as caught:
        client.predict("a handwritten 2", "", STEPS, 1.0, 0, "euler", "cpu:2", "cfg", 0, 1, 1, False,
                       api_name="/generate")
    assert "cfg > 1" in str(caught.value) and "Traceback" not in str(caught.value)


def test_served_app_runs_the_bench(served):
    from gradio_client import Client

    client = Client(served, verbose=False)
    plot, table, saved = client.predict("tiny", 2, 1, ["cfg"], "cpu:2", "", 1, 1, False, api_name="/bench")
    assert "cfg" in table and "speedup" in table
    assert [row["strategy"] for row in load_report(saved)["results"]] == ["serial", "cfg"]


def test_served_app_plots_an_uploaded_report(served, tmp_path):
    from gradio_client import Client, handle_file

    path = tmp_path / "bench.json"
    path.write_text(json.dumps(REPORT))
    plot, table = Client(served, verbose=False).predict(handle_file(str(path)), api_name="/load_bench")
    assert [row[0] for row in plot["data"]] == ["cfg", "batch"] and plot["mark"] == "bar"
    assert [row[-1] for row in plot["data"]] == ["not computed"] * 2  # the PSNR column, as the tooltip shows it
    assert "batch" in table


def _chrome():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        pytest.skip(f"headless browser test needs {' and '.join(missing)} (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # to list what the page requests
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _requested_hosts(driver) -> set[str]:
    from urllib.parse import urlparse

    hosts = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = urlparse(message["params"]["request"]["url"])
            if url.scheme in ("http", "https", "ws", "wss"):
                hosts.add(url.hostname)
    return hosts


def test_browser_generate_shows_both_images(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _chrome()
    try:
        driver.get(served)
        wait = WebDriverWait(driver, 120)
        prompt = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "textarea")))
        prompt.clear()
        prompt.send_keys("a handwritten 5")
        driver.find_element(By.ID, "generate-button").click()
        for elem_id in ("single-image", "tandem-image"):
            wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f"#{elem_id} img[src]")))
        wait.until(ec.text_to_be_present_in_element((By.ID, "generate-summary"), "per model call"))
        shot = tmp_path / "tandem-demo.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        assert shot.stat().st_size > 0
        assert _requested_hosts(driver) <= {"127.0.0.1"}  # the page fetches nothing from elsewhere
    finally:
        driver.quit()


def test_a_local_diffusers_folder_runs_in_the_demo(tiny_sd_folder):
    """`tandem demo --model PATH`: a diffusers SD folder behind the same Generate function."""
    session = DemoSession(model=str(tiny_sd_folder))
    try:
        result = generate_pair(session, "a red cube", steps=3, cfg=5.0, seed=2, devices="cpu:2", strategy="cfg")
    finally:
        session.shutdown()
    assert result.max_abs_diff <= 1 and result.tandem.model_calls == 3
    assert result.single.images[0].size == result.tandem.images[0].size
