"""End-to-end: the page at ``/`` in a real headless Chromium (Playwright) against a real
``pneumoscan serve`` process on a free 127.0.0.1 port, with an API key from the environment.

Set ``PNEUMOSCAN_SCREENSHOT_DIR`` to keep the screenshots the tests take.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
from PIL import Image
from xray_files import xray_dicom

from pneumoscan.inference import load_predictor

CHROMIUM = os.environ.get("PNEUMOSCAN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
API_KEY = "browser-test-key"
REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"chromium not found at {CHROMIUM} (apt-get install -y chromium)"),
]


@pytest.fixture(scope="module")
def server(tiny_run: Path) -> Iterator[str]:
    """``pneumoscan serve`` on a free port; yields its base URL."""
    env = {**os.environ, "PNEUMOSCAN_API_KEY": API_KEY, "MPLBACKEND": "Agg"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pneumoscan", "serve", "--checkpoint", str(tiny_run), "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env, cwd=REPO,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, f"no address in {line!r} (exit {proc.poll()})"
        url = f"http://127.0.0.1:{m.group(1)}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def model_info(server: str) -> dict[str, Any]:
    return httpx.get(server + "/v1/model", headers={"X-API-Key": API_KEY}, timeout=10).json()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class PageWatch:
    """A page that may only talk to the local server: other requests are aborted and
    recorded, as are console errors and uncaught exceptions."""

    def __init__(self, browser: Any, base: str) -> None:
        self.external: list[str] = []
        self.errors: list[str] = []
        self.context = browser.new_context(viewport={"width": 1360, "height": 900}, base_url=base)
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def _route(self, route: Any) -> None:
        url = route.request.url
        if re.match(r"^(https?://127\.0\.0\.1[:/]|data:|blob:)", url):
            route.continue_()
        else:
            self.external.append(url)
            route.abort()

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def watch(browser: Any, server: str) -> Iterator[PageWatch]:
    w = PageWatch(browser, server)
    yield w
    w.close()


def _screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    out = Path(os.environ.get("PNEUMOSCAN_SCREENSHOT_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    f = out / name
    page.screenshot(path=str(f), full_page=True)
    assert f.stat().st_size > 10_000
    return f


def _unlock(page: Any) -> None:
    """Open the page, which asks for the API key, and give it."""
    page.goto("/")
    page.wait_for_selector("#key-card:not(.hidden)")
    assert page.inner_text("#server-status-text") == "API key required"
    page.fill("#api-key", API_KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#server-status.ok")
    assert page.inner_text("#server-status-text") == "ready"
    assert page.is_hidden("#key-card")


def test_upload_shows_probability_and_overlay(watch: PageWatch, model_info: dict[str, Any], tiny_run: Path,
                                              xray_dir: Path, tmp_path: Path) -> None:
    page = watch.page
    _unlock(page)
    facts = page.inner_text("#model-facts")
    assert model_info["name"] in facts and "threshold" in facts
    from pneumoscan.guard import default_guard_path

    assert model_info["capabilities"]["guard"] is default_guard_path().is_file()
    image = sorted((xray_dir / "val" / "PNEUMONIA").glob("*.jpeg"))[0]
    page.set_input_files("#file-input", str(image))
    page.wait_for_selector("#result-body:not(.hidden)", timeout=30_000)

    ref = load_predictor(tiny_run).predict_image(image)
    assert page.inner_text("#probability") == f"{100 * ref.probability:.1f} %"
    assert page.inner_text("#label") == ref.label
    assert f"{100 * ref.threshold:.1f} %" in page.inner_text("#threshold-text")
    assert page.evaluate("document.getElementById('xray').naturalWidth") == 224
    gauge = page.evaluate("document.getElementById('gauge-fill').style.width")
    assert float(gauge.rstrip("%")) == pytest.approx(100 * ref.probability, abs=0.01)

    if model_info["capabilities"]["heatmap"]:
        page.wait_for_selector("#overlay:not(.hidden)")
        assert page.get_attribute("#overlay", "src").startswith("data:image/png;base64,")
        assert page.evaluate("document.getElementById('overlay').naturalWidth") > 0
        page.fill("#opacity", "80")
        page.dispatch_event("#opacity", "input")
        assert page.evaluate("getComputedStyle(document.getElementById('overlay')).opacity") == "0.8"
        assert page.inner_text("#opacity-value") == "80 %"
        assert page.is_visible("#heat-legend")  # the colour scale of the map, 0 -> 1 in jet
        assert "linear-gradient" in page.evaluate("getComputedStyle(document.querySelector('.heat-legend-bar')).backgroundImage")
    else:  # no Grad-CAM on this server: the page says so and shows no overlay
        assert page.is_hidden("#overlay") and page.is_disabled("#opacity") and page.is_hidden("#heat-legend")
        assert "not available" in page.inner_text("#overlay-note")
    _screenshot(page, tmp_path, "page-result.png")
    assert watch.external == []
    assert [e for e in watch.errors if "status of 401" not in e] == []  # the 401 before the key was given




def test_threshold_slider_relabels_without_a_request(watch: PageWatch, model_info: dict[str, Any], tiny_run: Path,
                                                     xray_dir: Path, tmp_path: Path) -> None:
    page = watch.page
    _unlock(page)
    image = sorted((xray_dir / "val" / "NORMAL").glob("*.jpeg"))[0]
    page.set_input_files("#file-input", str(image))
    page.wait_for_selector("#result-body:not(.hidden)", timeout=30_000)
    ref = load_predictor(tiny_run).predict_image(image)
    assert page.is_hidden("#warnings") and ref.warnings == []
    curve = model_info["operating_curve"]
    t = curve["thresholds"]
    assert t[int(page.input_value("#threshold-slider"))] == pytest.approx(ref.threshold, abs=1e-6)  # starts at the operating point
    assert page.is_disabled("#threshold-reset") and page.inner_text("#label") == ref.label
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    other = [i for i, x in enumerate(t) if abs(x - ref.threshold) > 1e-6]  # thresholds other than the operating one
    below = max(i for i in other if t[i] <= ref.probability)
    above = min(i for i in other if t[i] > ref.probability)
    for i, label in ((below, "PNEUMONIA"), (above, "NORMAL")):
        page.fill("#threshold-slider", str(i))
        page.dispatch_event("#threshold-slider", "input")
        assert page.inner_text("#label") == label
        assert page.inner_text("#threshold-value") == f"{100 * t[i]:.1f} %"
        metrics = page.inner_text("#threshold-metrics")
        assert f"sensitivity {100 * curve['sensitivity'][i]:.1f} %" in metrics and f"specificity {100 * curve['specificity'][i]:.1f} %" in metrics
        assert float(page.evaluate("document.getElementById('gauge-mark').style.left").rstrip("%")) == pytest.approx(100 * t[i], abs=0.01)
        assert "chosen threshold" in page.inner_text("#verdict")
    _screenshot(page, tmp_path, "page-threshold.png")
    page.click("#threshold-reset")
    assert page.inner_text("#label") == ref.label and "operating threshold" in page.inner_text("#verdict")
    assert page.inner_text("#probability") == f"{100 * ref.probability:.1f} %"
    assert requests == []  # re-labelled from the probability the page already has
    assert watch.external == []


def test_dicom_preview_and_error_message(watch: PageWatch, xray_dir: Path, tmp_path: Path) -> None:
    page = watch.page
    _unlock(page)
    dcm = xray_dicom(sorted((xray_dir / "val" / "NORMAL").glob("*.jpeg"))[0])
    page.set_input_files("#file-input", files=[{"name": "chest.dcm", "mimeType": "application/dicom", "buffer": dcm}])
    page.wait_for_selector("#result-body:not(.hidden)", timeout=30_000)
    assert page.get_attribute("#xray", "src").startswith("data:image/png;base64,")  # server-rendered DICOM preview
    assert re.fullmatch(r"\d{1,3}\.\d %", page.inner_text("#probability"))
    assert "DICOM" in page.inner_text("#file-meta")
    _screenshot(page, tmp_path, "page-dicom.png")

    page.click("#clear-btn")
    page.wait_for_selector("#dropzone:not(.hidden)")
    page.set_input_files("#file-input", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an x-ray\n" * 50}])
    page.wait_for_selector("#error:not(.hidden)", timeout=30_000)
    assert page.inner_text("#error") == "Could not analyse notes.txt: not a JPEG, PNG or DICOM file."
    assert page.is_hidden("#result-body")
    _screenshot(page, tmp_path, "page-error.png")
    assert watch.external == []
    # the browser itself logs the failed requests (401 before the key, 415 for the text file)
    assert all(re.search(r"status of (401|415)", e) for e in watch.errors), watch.errors


@pytest.fixture(scope="module")
def guarded_server(tiny_run: Path) -> Iterator[str]:
    """The app in a uvicorn server (thread, free 127.0.0.1 port, no API key) whose predictor
    carries a real guard with an accept-all classifier, so its rules refuse colour images."""
    import socket
    import threading

    import uvicorn

    from pneumoscan.guard import Guard
    from pneumoscan.guard.core import FORMAT
    from pneumoscan.guard.features import feature_names
    from pneumoscan.serving.app import create_app

    names = feature_names()
    predictor = load_predictor(tiny_run)
    predictor.guard = Guard({"format": FORMAT, "features": names, "mean": [0.0] * len(names),  # type: ignore[attr-defined]
                             "scale": [1.0] * len(names), "coef": [0.0] * len(names), "intercept": 10.0, "threshold": 0.5})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(predictor), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def test_refused_input_is_explained(browser: Any, guarded_server: str, tmp_path: Path) -> None:
    w = PageWatch(browser, guarded_server)
    try:
        page = w.page
        page.goto("/")
        page.wait_for_selector("#server-status.ok")
        yy, xx = np.mgrid[0:256, 0:256]
        photo = np.stack([xx, yy, 255 - xx], axis=-1).astype(np.uint8)  # a colour gradient: plainly no radiograph
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, format="PNG")
        page.set_input_files("#file-input", files=[{"name": "holiday.png", "mimeType": "image/png", "buffer": buf.getvalue()}])
        page.wait_for_selector("#refused:not(.hidden)", timeout=30_000)
        assert page.inner_text("#label") == "REFUSED"
        assert "colour image" in page.inner_text("#refused-reason")
        assert page.is_hidden("#result-body") and page.is_hidden("#overlay")
        _screenshot(page, tmp_path, "page-refused.png")
        assert w.external == [] and w.errors == []
    finally:
        w.close()


def test_docs_render_offline(watch: PageWatch, tmp_path: Path) -> None:
    page = watch.page
    page.goto("/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    assert "pneumoscan" in page.inner_text(".swagger-ui .info .title")
    page.wait_for_selector(".opblock-summary-path[data-path=\"/v1/predict\"]")
    _screenshot(page, tmp_path, "docs.png")
    assert watch.external == [], watch.external
    assert watch.errors == [], watch.errors
