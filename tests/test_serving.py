"""The web service: every status code with real images, API key on and off, CORS, privacy,
path traversal, offline docs, and — against a real uvicorn server on 127.0.0.1 — streamed
size limits, stalled uploads, bounded upload memory and /healthz while predictions run."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from xray_files import xray_dicom

from pneumoscan.core.imaging import heatmap_rgba
from pneumoscan.data.io import MAX_PIXELS
from pneumoscan.inference import Predictor, load_predictor
from pneumoscan.models.bundle import load_bundle
from pneumoscan.serving import ServeSettings, create_app
from pneumoscan.data.formats import sniff_format
from pneumoscan.serving.upload import ByteBudget
from pneumoscan.utils.io import sha256_file

REPO = Path(__file__).resolve().parent.parent
#: TestClient's address: a Host the service accepts by default (not "testserver").
LOOPBACK = "http://127.0.0.1"


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def run_dir(tiny_run: Path) -> Path:
    return tiny_run


@pytest.fixture(scope="module")
def predictor(run_dir: Path) -> Predictor:
    return load_predictor(run_dir)


@pytest.fixture(scope="module")
def client(predictor: Predictor) -> Iterator[TestClient]:
    with TestClient(create_app(predictor), base_url=LOOPBACK) as c:
        yield c


@pytest.fixture(scope="module")
def pneumonia_jpeg(xray_dir: Path) -> Path:
    return sorted((xray_dir / "val" / "PNEUMONIA").glob("*.jpeg"))[0]


@pytest.fixture(scope="module")
def normal_jpeg(xray_dir: Path) -> Path:
    return sorted((xray_dir / "val" / "NORMAL").glob("*.jpeg"))[0]


def _reencode(path: Path, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    with Image.open(path) as im:
        im.convert("L").save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A syntactically valid PNG header declaring width×height pixels (a decompression bomb
    as far as any decoder is concerned) followed by a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _post(c: TestClient | httpx.Client, data: bytes, name: str = "x.jpeg", ctype: str = "image/jpeg", query: str = "", **kw: Any) -> httpx.Response:
    return c.post(f"/v1/predict{query}", files={"file": (name, data, ctype)}, **kw)


def _assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert isinstance(body["detail"], str) and body["detail"] and "\n" not in body["detail"]
    if code:
        assert body["error"] == code, body
    return body




def _decode_png_b64(b64: str) -> Image.Image:
    import base64

    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(io.BytesIO(raw))
    im.load()
    return im


class LiveServer:
    """The app under a real uvicorn server on 127.0.0.1 (random free port), in a thread."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def _raw_http(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send raw bytes (no client-side path normalisation) and return (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        with contextlib.suppress(socket.timeout, ConnectionResetError):
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body


def _slow(predictor: Predictor, seconds: float) -> Predictor:
    """Make every model call of this (private) predictor take at least ``seconds`` longer:
    stands in for a big model on a busy CPU; the real model still answers."""
    original = predictor.predict_arrays

    def slow_predict_arrays(*a: Any, **kw: Any) -> Any:
        time.sleep(seconds)
        return original(*a, **kw)

    predictor.predict_arrays = slow_predict_arrays  # type: ignore[method-assign]
    return predictor


# ----------------------------------------------------------------------------- health, model, page
def test_healthz(client: TestClient, predictor: Predictor) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model"] == predictor.name and body["pending"] == 0
    assert re.fullmatch(r"[0-9a-f]{16}", r.headers["x-request-id"])


def test_model_info_matches_checkpoint(client: TestClient, run_dir: Path) -> None:
    bundle = load_bundle(run_dir)
    m = client.get("/v1/model").json()
    assert m["sha256"] == sha256_file(run_dir / "best.pt") == bundle.sha256
    assert m["model_name"] == "seed_cnn" and m["input_size"] == bundle.input_size
    assert m["operating_point"]["threshold"] == pytest.approx(bundle.threshold)
    assert m["operating_point"]["temperature"] == pytest.approx(bundle.temperature)
    assert m["operating_point"]["threshold_method"] == bundle.threshold_method
    for k, v in bundle.val_metrics.items():
        if isinstance(v, float) and np.isfinite(v):
            assert m["val_metrics"][k] == pytest.approx(v), k
    assert m["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert m["limits"]["max_upload_mb"] == 50 and m["limits"]["formats"] == ["JPEG", "PNG", "DICOM"]
    card = run_dir / "MODEL_CARD.md"
    if card.is_file():
        assert m["model_card"] == card.read_text(encoding="utf-8")[:64_000]
    else:
        assert m["model_card"] is None


def test_model_card_beside_checkpoint_is_served(tmp_path: Path, run_dir: Path) -> None:
    (tmp_path / "best.pt").write_bytes((run_dir / "best.pt").read_bytes())
    (tmp_path / "MODEL_CARD.md").write_text("# seed_cnn card\nFor research only.\n", encoding="utf-8")
    with TestClient(create_app(load_predictor(tmp_path)), base_url=LOOPBACK) as c:
        assert c.get("/v1/model").json()["model_card"] == "# seed_cnn card\nFor research only.\n"


def test_page_and_assets_are_local(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    html = r.text
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs, "page references no assets"
    assert not [u for u in refs if re.match(r"(?i)^(https?:)?//", u)], "page loads something from another host"
    for ref in refs:
        assert client.get(ref).status_code == 200, ref
    js = client.get("/static/app.js")
    assert js.headers["content-type"].startswith("text/javascript") and "/v1/predict" in js.text
    assert not re.search(r"https?://", js.text + client.get("/static/style.css").text)


def test_docs_work_offline(client: TestClient) -> None:
    r = client.get("/docs")
    assert r.status_code == 200
    refs = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert any(u.endswith("swagger-ui-bundle.js") for u in refs) and any(u.endswith(".css") for u in refs)
    for ref in refs:
        assert not re.match(r"(?i)^(https?:)?//", ref), f"/docs loads {ref} from another host"
        assert client.get(ref).status_code == 200, ref
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["file"] and body["properties"]["file"]["format"] == "binary"
    assert {"200", "413", "415", "422"} <= set(spec["paths"]["/v1/predict"]["post"]["responses"])


# ----------------------------------------------------------------------------- predictions
def test_predict_jpeg_equals_predictor(client: TestClient, predictor: Predictor, pneumonia_jpeg: Path) -> None:
    r = _post(client, pneumonia_jpeg.read_bytes(), headers={"X-Request-ID": "test-req-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = predictor.predict_image(pneumonia_jpeg)
    assert body["probability"] == pytest.approx(ref.probability, abs=1e-9)
    assert body["label"] == ref.label == ("PNEUMONIA" if body["probability"] >= body["threshold"] else "NORMAL")
    assert body["threshold"] == pytest.approx(predictor.threshold) and body["model"] == predictor.name
    assert body["refused"] is None and body["heatmap"] is None and body["preview"] is None
    assert body["image"] == {"format": "JPEG", "width": 224, "height": 224, "bytes": pneumonia_jpeg.stat().st_size}
    assert body["request_id"] == "test-req-1" == r.headers["x-request-id"]
    t = body["timing_ms"]
    assert {"upload", "queue", "decode", "inference", "total"} <= set(t)
    assert all(v >= 0 for v in t.values()) and t["total"] >= t["inference"]


def test_predict_fullres_jpeg_equals_predictor(client: TestClient, predictor: Predictor, fullres_dir: Path) -> None:
    for path in sorted(fullres_dir.glob("*.jpeg")):
        body = _post(client, path.read_bytes()).json()
        assert body["probability"] == pytest.approx(predictor.predict_image(path).probability, abs=1e-9), path.name
        with Image.open(path) as im:
            assert (body["image"]["width"], body["image"]["height"]) == im.size


def test_predict_png_equals_decoded_jpeg(client: TestClient, normal_jpeg: Path) -> None:
    jpeg = _post(client, normal_jpeg.read_bytes()).json()
    png = _post(client, _reencode(normal_jpeg, "PNG"), "x.png", "image/png").json()
    assert png["image"]["format"] == "PNG"
    assert png["probability"] == pytest.approx(jpeg["probability"], abs=1e-6)


def test_predict_dicom_with_preview(client: TestClient, predictor: Predictor, normal_jpeg: Path) -> None:
    dcm = xray_dicom(normal_jpeg)
    r = _post(client, dcm, "scan.dcm", "application/dicom", "?preview=true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"] == {"format": "DICOM", "width": 224, "height": 224, "bytes": len(dcm)}
    assert body["refused"] is None
    assert body["probability"] == pytest.approx(predictor.predict_image(dcm, name="scan.dcm").probability, abs=1e-9)
    im = _decode_png_b64(body["preview"]["png_base64"])
    assert im.mode == "L" and im.size == (body["preview"]["width"], body["preview"]["height"]) == (224, 224)
    # MONOCHROME1 undone: the preview is the original radiograph (bone bright), not its negative
    with Image.open(normal_jpeg) as src:
        original = np.asarray(src.convert("L"), dtype=np.float64)
    assert np.abs(np.asarray(im, dtype=np.float64) - original).mean() < 2.0


def test_heatmap_is_the_models_grad_cam(client: TestClient, predictor: Predictor, xray_dir: Path) -> None:
    from pneumoscan.data.io import read_image
    from pneumoscan.models import get_spec

    assert client.get("/v1/model").json()["capabilities"]["heatmap"] is True
    # an image whose map is not all zero (a tiny model may hold no evidence for some images)
    images = sorted((xray_dir / "val").glob("*/*.jpeg"))
    maps = {p: predictor.explain(read_image(p, max_side=predictor.input_size)) for p in images}
    path = next((p for p in images if maps[p].max() > 0), images[0])
    body = _post(client, path.read_bytes(), query="?heatmap=true").json()
    hm = body["heatmap"]
    assert hm["method"] == "grad-cam" and hm["layer"] == get_spec("seed_cnn").gradcam_layer
    im = _decode_png_b64(hm["png_base64"])
    assert im.mode == "RGBA" and im.size == (hm["width"], hm["height"]) == (224, 224)
    # the same map computed independently, rendered the same way: identical pixels (PNG is lossless)
    assert np.array_equal(np.asarray(im), heatmap_rgba(maps[path], 224, 224))
    # the probability is unchanged by asking for the heatmap
    plain = _post(client, path.read_bytes()).json()
    assert plain["heatmap"] is None and plain["probability"] == pytest.approx(body["probability"], abs=1e-12)


def test_fullres_heatmap_keeps_the_image_aspect(client: TestClient, fullres_dir: Path) -> None:
    path = fullres_dir / "NORMAL2-IM-1438-0001.jpeg"
    with Image.open(path) as src:
        w0, h0 = src.size
    body = _post(client, path.read_bytes(), query="?heatmap=true&preview=true").json()
    hm, pv = body["heatmap"], body["preview"]
    assert (hm["width"], hm["height"]) == (pv["width"], pv["height"])
    assert max(hm["width"], hm["height"]) <= 512
    assert hm["width"] / hm["height"] == pytest.approx(w0 / h0, rel=0.02)


def test_heatmap_rgba_colours_follow_the_map() -> None:
    cam = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    rgba = heatmap_rgba(cam, 8, 8)
    assert rgba.shape == (8, 8, 4) and rgba.dtype == np.uint8
    assert rgba[0, 0, 2] > rgba[0, 0, 0] and rgba[-1, -1, 0] > rgba[-1, -1, 2]  # cold blue → hot red
    assert rgba[0, 0, 3] < rgba[-1, -1, 3]  # ignored regions more transparent


def test_sniff_format_decides_by_content() -> None:
    assert sniff_format(b"\xff\xd8\xff\xe0rest") == "JPEG"
    assert sniff_format(b"\x89PNG\r\n\x1a\nrest") == "PNG"
    assert sniff_format(b"\0" * 128 + b"DICM") == "DICOM"
    assert sniff_format(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100") == "DICOM"  # no preamble
    assert sniff_format(b"RIFF\x10\x00\x00\x00WEBPVP8 ") == "WEBP"  # not served, whatever its name


# ----------------------------------------------------------------------------- the not-a-chest-X-ray guard
def rules_only_guard() -> Any:
    """A real :class:`pneumoscan.guard.Guard` whose classifier accepts everything, so only its
    rules (colour image, DICOM modality/body part, blank, size, aspect) refuse: the service's
    refusal path, independent of the shipped guard parameters."""
    from pneumoscan.guard import Guard
    from pneumoscan.guard.core import FORMAT
    from pneumoscan.guard.features import feature_names

    names = feature_names()
    n = len(names)
    return Guard({"format": FORMAT, "features": names, "mean": [0.0] * n, "scale": [1.0] * n, "coef": [0.0] * n,
                  "intercept": 10.0, "threshold": 0.5})


def colour_photo_png() -> bytes:
    yy, xx = np.mgrid[0:256, 0:256]
    buf = io.BytesIO()
    Image.fromarray(np.stack([xx, yy, 255 - xx], axis=-1).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_guard_refusals_are_200_with_a_reason(run_dir: Path, fixtures_dir: Path, normal_jpeg: Path) -> None:
    guarded = load_predictor(run_dir)
    guarded.guard = rules_only_guard()  # type: ignore[attr-defined]
    with TestClient(create_app(guarded), base_url=LOOPBACK) as c:
        assert c.get("/v1/model").json()["capabilities"]["guard"] is True
        r = _post(c, colour_photo_png(), "holiday.png", "image/png", "?heatmap=true")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["probability"] is None and body["label"] is None and body["heatmap"] is None
        assert "colour" in body["refused"] and body["extra"]["guard_score"] == 0.0
        body = _post(c, (fixtures_dir / "dicom" / "ct.dcm").read_bytes(), "ct.dcm", "application/dicom").json()
        assert "CT" in body["refused"] and body["probability"] is None
        ok = _post(c, normal_jpeg.read_bytes()).json()
        assert ok["refused"] is None and ok["extra"]["guard_score"] > 0.5 and 0.0 <= ok["probability"] <= 1.0
    with TestClient(create_app(guarded, ServeSettings(guard=False)), base_url=LOOPBACK) as c:
        assert c.get("/v1/model").json()["capabilities"]["guard"] is False
        assert _post(c, colour_photo_png(), "holiday.png", "image/png").json()["refused"] is None


def test_shipped_guard_when_installed(client: TestClient) -> None:
    from pneumoscan.guard import default_guard_path

    caps = client.get("/v1/model").json()["capabilities"]
    assert caps["guard"] is default_guard_path().is_file()
    body = _post(client, colour_photo_png(), "holiday.png", "image/png").json()
    if caps["guard"]:
        assert body["refused"] and body["probability"] is None
    else:
        assert body["refused"] is None and body["probability"] is not None


# ----------------------------------------------------------------------------- every error status
def test_413_too_large(predictor: Predictor, fullres_dir: Path) -> None:
    big = (fullres_dir / "NORMAL2-IM-1438-0001.jpeg").read_bytes()  # 171 kB
    with TestClient(create_app(predictor, ServeSettings(max_upload_mb=0.1)), base_url=LOOPBACK) as c:
        _assert_error(_post(c, big), 413, "payload_too_large")
        assert _post(c, (fullres_dir / "person1003_virus_1685.jpeg").read_bytes()).status_code == 200  # 53 kB fits
        # declared Content-Length over the limit: refused before reading anything
        r = c.post("/v1/predict", content=b"x" * 10, headers={"content-type": "multipart/form-data; boundary=b", "content-length": "99999999"})
        _assert_error(r, 413, "payload_too_large")


def test_413_too_many_pixels(client: TestClient) -> None:
    side = int(MAX_PIXELS ** 0.5) + 100
    body = _assert_error(_post(client, _png_with_declared_size(side, side), "bomb.png", "image/png"), 413, "image_too_large")
    assert "too large" in body["detail"]


@pytest.mark.parametrize("name,data,ctype", [
    ("notes.txt", b"patient notes, not an image\n" * 20, "text/plain"),
    ("report.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "application/pdf"),
])
def test_415_not_an_image(client: TestClient, name: str, data: bytes, ctype: str) -> None:
    _assert_error(_post(client, data, name, ctype), 415, "unsupported_media_type")


def test_415_image_format_not_accepted(client: TestClient, normal_jpeg: Path) -> None:
    for fmt in ("GIF", "BMP"):
        _assert_error(_post(client, _reencode(normal_jpeg, fmt), f"x.{fmt.lower()}", f"image/{fmt.lower()}"), 415)


def test_the_file_name_does_not_pick_the_decoder(client: TestClient, normal_jpeg: Path) -> None:
    _assert_error(_post(client, _reencode(normal_jpeg, "WEBP"), "x.dcm", "application/dicom"), 415, "unsupported_media_type")
    r = _post(client, normal_jpeg.read_bytes(), "x.dcm", "application/dicom")  # a JPEG is a JPEG, whatever its name
    assert r.status_code == 200, r.text


def test_415_not_multipart(client: TestClient, normal_jpeg: Path) -> None:
    r = client.post("/v1/predict", content=normal_jpeg.read_bytes(), headers={"content-type": "image/jpeg"})
    _assert_error(r, 415, "unsupported_media_type")


def test_422_unreadable(client: TestClient, normal_jpeg: Path, fixtures_dir: Path) -> None:
    data = normal_jpeg.read_bytes()
    _assert_error(_post(client, data[: len(data) // 3]), 422, "unreadable_image")  # truncated JPEG
    _assert_error(_post(client, b"\xff\xd8\xff\xe0" + os.urandom(2000)), 422, "unreadable_image")  # JPEG magic, garbage
    _assert_error(_post(client, (fixtures_dir / "dicom" / "no_pixels.dcm").read_bytes(), "a.dcm", "application/dicom"), 422)


def test_422_missing_or_empty_field(client: TestClient, normal_jpeg: Path) -> None:
    _assert_error(client.post("/v1/predict", files={"image": ("x.jpeg", normal_jpeg.read_bytes(), "image/jpeg")}), 422, "missing_file")
    _assert_error(client.post("/v1/predict"), 422, "missing_file")
    _assert_error(_post(client, b""), 422, "empty_file")
    r = client.post("/v1/predict", content=b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
                    headers={"content-type": "multipart/form-data; boundary=b"})
    _assert_error(r, 422, "malformed_body")


def test_422_bad_query(client: TestClient, normal_jpeg: Path) -> None:
    _assert_error(_post(client, normal_jpeg.read_bytes(), query="?heatmap=perhaps"), 422, "invalid_request")


def test_404_and_405_are_json(client: TestClient) -> None:
    _assert_error(client.get("/v1/nothing"), 404, "not_found")
    _assert_error(client.get("/v1/predict"), 405, "method_not_allowed")


# ----------------------------------------------------------------------------- API key
def test_api_key_off_by_default(client: TestClient, normal_jpeg: Path) -> None:
    assert client.get("/v1/model").status_code == 200
    assert _post(client, normal_jpeg.read_bytes()).status_code == 200


def test_api_key_required_on_every_v1_route(predictor: Predictor, normal_jpeg: Path) -> None:
    key = "k3y-for-tests-only"
    with TestClient(create_app(predictor, ServeSettings(api_key=key)), base_url=LOOPBACK) as c:
        for r in (c.get("/v1/model"), _post(c, normal_jpeg.read_bytes()),
                  c.get("/v1/model", headers={"X-API-Key": "wrong"}),
                  c.get("/v1/model", headers={"Authorization": "Bearer wrong"}),
                  c.get("/v1/model", headers={"Authorization": f"Basic {key}"})):
            _assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/v1/model", headers={"X-API-Key": key}).status_code == 200
        assert c.get("/v1/model", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert _post(c, normal_jpeg.read_bytes(), headers={"X-API-Key": key}).status_code == 200
        # liveness, the page and the docs stay open
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200 and c.get("/docs").status_code == 200
        spec = c.get("/openapi.json").json()
        assert {"APIKeyHeader", "HTTPBearer"} <= set(spec["components"]["securitySchemes"])


def test_empty_api_key_is_a_config_error(predictor: Predictor) -> None:
    from pneumoscan.errors import ConfigError

    with pytest.raises(ConfigError):
        create_app(predictor, ServeSettings(api_key="  "))
    with pytest.raises(ConfigError):
        create_app(predictor, ServeSettings(max_upload_mb=0))


# ----------------------------------------------------------------------------- CORS, privacy, traversal
def test_cors_off_unless_configured(client: TestClient, predictor: Predictor) -> None:
    r = client.get("/v1/model", headers={"Origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in r.headers
    with TestClient(create_app(predictor, ServeSettings(cors_origins=("https://viewer.example",))), base_url=LOOPBACK) as c:
        ok = c.get("/v1/model", headers={"Origin": "https://viewer.example"})
        assert ok.headers["access-control-allow-origin"] == "https://viewer.example"
        other = c.get("/v1/model", headers={"Origin": "https://elsewhere.example"})
        assert "access-control-allow-origin" not in other.headers
        pre = c.options("/v1/predict", headers={"Origin": "https://viewer.example", "Access-Control-Request-Method": "POST",
                                                "Access-Control-Request-Headers": "X-API-Key"})
        assert pre.status_code == 200 and "x-api-key" in pre.headers["access-control-allow-headers"].lower()


def test_uploads_are_not_logged_or_written(client: TestClient, fullres_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    # a real X-ray as a 3+ MB PNG: bigger than the 1 MB at which form parsers usually spool
    # uploads to a temporary file
    with Image.open(fullres_dir / "NORMAL2-IM-1438-0001.jpeg") as src:
        big = src.convert("L").resize((2000, 1700))
    buf = io.BytesIO()
    big.save(buf, format="PNG", compress_level=0)
    data = buf.getvalue()
    assert len(data) > 3_000_000

    def no_disk(*a: Any, **kw: Any) -> Any:
        raise AssertionError("the service tried to create a temporary file")

    for name in ("SpooledTemporaryFile", "NamedTemporaryFile", "TemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, no_disk)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    secret_name = "Jane-Doe-1961-03-02.png"
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("pneumoscan")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        r = _post(client, data, secret_name, "image/png", headers={"X-Request-ID": "privacy-check"})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert r.status_code == 200, r.text
    assert list(tmp_path.iterdir()) == []
    text = "\n".join(rec.getMessage() for rec in records)
    assert "Jane-Doe" not in text and "Jane-Doe" not in r.text
    line = [rec.getMessage() for rec in records if "id=privacy-check" in rec.getMessage()]
    assert len(line) == 1, text
    assert f"bytes_in={r.request.headers['content-length']}" in line[0]
    assert "status=200" in line[0] and "latency_ms=" in line[0] and "outcome=ok" in line[0]


@pytest.mark.parametrize("path", [
    "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/..%2F..%2Fcli.py", "/static/%2e%2e%2f%2e%2e%2ferrors.py",
    "/docs-assets/%2e%2e/core.py", "/docs-assets/..%2f__init__.py", "/docs-assets/%2e%2e/%2e%2e/fastapi/__init__.py",
    "/static/.%2e/.%2e/.%2e/.%2e/.%2e/.%2e/etc/passwd",
])
def test_no_path_traversal(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404, (path, r.status_code)
    assert "import" not in r.text and "root:" not in r.text


# ----------------------------------------------------------------------------- the byte budget
def test_byte_budget_is_fifo_bounded_and_times_out() -> None:
    async def scenario() -> None:
        b = ByteBudget(100)
        assert await b.acquire(60, 1) == 60
        order: list[str] = []

        async def take(name: str, n: int) -> None:
            await b.acquire(n, 5)
            order.append(name)

        t1 = asyncio.create_task(take("first", 50))
        await asyncio.sleep(0.01)
        t2 = asyncio.create_task(take("second", 10))  # would fit, but must not overtake "first"
        await asyncio.sleep(0.01)
        assert order == [] and b.used == 60
        with pytest.raises(asyncio.TimeoutError):
            await b.acquire(100, 0.05)
        b.release(60)
        await asyncio.gather(t1, t2)
        assert order == ["first", "second"] and b.used == 60
        b.release(60)
        assert b.used == 0 and not b._waiters
        assert await b.acquire(10_000, 1) == 100  # capped at capacity
    asyncio.run(scenario())


# ----------------------------------------------------------------------------- against a real server
@pytest.mark.slow
def test_live_server_streams_and_stops_at_the_limit(predictor: Predictor, normal_jpeg: Path) -> None:
    """A chunked upload of unbounded length is cut off right after the limit: the client
    gets 413 long before it could have sent everything."""
    app = create_app(predictor, ServeSettings(max_upload_mb=1))
    sent = {"bytes": 0}

    def endless() -> Iterator[bytes]:
        yield b'--bnd\r\nContent-Disposition: form-data; name="file"; filename="x.jpeg"\r\nContent-Type: image/jpeg\r\n\r\n'
        chunk = b"\xff" * 65536
        for _ in range(3000):  # up to 196 MB if the server kept reading
            sent["bytes"] += len(chunk)
            yield chunk

    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        try:
            r = c.post("/v1/predict", content=endless(), headers={"content-type": "multipart/form-data; boundary=bnd"})
            _assert_error(r, 413, "payload_too_large")
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            pass  # the server closed the connection after answering 413 while we were still sending
        assert sent["bytes"] < 40_000_000, f"server kept reading: {sent['bytes']:,} bytes sent"
        assert app.state.budget.used == 0
        # the server is still healthy and serves a normal upload
        assert c.get("/healthz").status_code == 200
        assert _post(c, normal_jpeg.read_bytes()).status_code == 200


@pytest.mark.slow
def test_live_server_times_out_stalled_upload(predictor: Predictor) -> None:
    app = create_app(predictor, ServeSettings(upload_idle_timeout_s=0.5))
    head = (b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\nConnection: close\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n\xff\xd8")
    with LiveServer(app) as srv:
        t0 = time.monotonic()
        status, body = _raw_http(srv.port, head, timeout=10)
        assert status == 408 and json.loads(body)["error"] == "request_timeout"
        assert time.monotonic() - t0 < 5
        assert app.state.budget.used == 0


@pytest.mark.slow
def test_live_server_path_traversal_raw(client: TestClient, predictor: Predictor) -> None:
    with LiveServer(create_app(predictor)) as srv:
        for target in (b"/static/../app.py", b"/static/../../errors.py", b"/docs-assets/../core.py",
                       b"/static/%2e%2e/app.py", b"/docs-assets/../../../../../../etc/passwd", b"/static//etc/passwd"):
            status, body = _raw_http(srv.port, b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert status in (400, 404), (target, status)
            assert b"import " not in body and b"root:" not in body, target
        status, body = _raw_http(srv.port, b"GET /static/app.js HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert status == 200 and b"/v1/predict" in body


@pytest.mark.slow
def test_live_server_healthz_answers_while_predictions_run(run_dir: Path, fullres_dir: Path) -> None:
    """Six uploads to a model that needs >= 0.8 s per image: /healthz keeps answering in a
    fraction of that, and sees the pending predictions."""
    app = create_app(_slow(load_predictor(run_dir), 0.8), ServeSettings(inference_threads=1))
    data = (fullres_dir / "person1003_virus_1685.jpeg").read_bytes()
    results: list[int] = []

    def upload() -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            results.append(_post(c, data).status_code)

    with LiveServer(app) as srv:
        threads = [threading.Thread(target=upload) for _ in range(6)]
        for t in threads:
            t.start()
        health: list[tuple[float, int]] = []
        with httpx.Client(base_url=srv.url, timeout=10) as hc:
            while any(t.is_alive() for t in threads):
                t0 = time.perf_counter()
                r = hc.get("/healthz")
                health.append((time.perf_counter() - t0, r.json()["pending"]))
                time.sleep(0.05)
        for t in threads:
            t.join()
    assert results == [200] * 6
    during = [lat for lat, pending in health if pending > 0]
    assert len(during) >= 10, health
    assert max(during) < 0.5, f"/healthz blocked for {max(during):.2f} s while predicting"


@pytest.mark.slow
def test_live_server_503_when_inference_cannot_finish_in_time(run_dir: Path, normal_jpeg: Path) -> None:
    app = create_app(_slow(load_predictor(run_dir), 1.5), ServeSettings(request_timeout_s=0.5))
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = _post(c, normal_jpeg.read_bytes())
        _assert_error(r, 503, "timeout")
        assert r.headers["retry-after"]


@pytest.mark.slow
def test_live_server_bounds_buffered_uploads(run_dir: Path, fullres_dir: Path) -> None:
    """Six concurrent ~1 MB uploads with a 2.5 MB upload budget: all answered, never more
    than the budget buffered at once."""
    app = create_app(_slow(load_predictor(run_dir), 0.2), ServeSettings(max_upload_mb=1.2, upload_memory_mb=2.5, inference_threads=1))
    budget: ByteBudget = app.state.budget
    peak = {"used": 0}
    acquire = budget.acquire

    async def spy_acquire(n: int, timeout: float) -> int:
        got = await acquire(n, timeout)
        peak["used"] = max(peak["used"], budget.used)
        return got

    budget.acquire = spy_acquire  # type: ignore[method-assign]
    img = Image.open(fullres_dir / "NORMAL2-IM-1438-0001.jpeg").convert("L").resize((1000, 1000))
    noise = np.random.default_rng(1).integers(-12, 12, (1000, 1000))
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8)).save(buf, "PNG", compress_level=1)
    data = buf.getvalue()
    assert 700_000 < len(data) < 1_200_000, len(data)
    codes: list[int] = []

    def upload() -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            codes.append(_post(c, data, "x.png", "image/png").status_code)

    with LiveServer(app) as srv:
        threads = [threading.Thread(target=upload) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert codes == [200] * 6
    assert 0 < peak["used"] <= budget.capacity
    assert peak["used"] < 6 * len(data), "every upload was buffered at once"
    assert budget.used == 0


# ----------------------------------------------------------------------------- the CLI
def test_cli_serve_bad_input_is_one_line(cli: Any, tmp_path: Path) -> None:
    r = cli("serve", "--checkpoint", str(tmp_path / "missing.pt"), "--port", "0")
    assert r.code == 1 and len(r.err_lines) == 1 and "checkpoint not found" in r.err and "Traceback" not in r.err
    r = cli("serve", "--max-upload-mb", "0", "--port", "0")
    assert r.code == 1 and len(r.err_lines) == 1 and "max_upload_mb" in r.err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        r = cli("serve", "--port", str(busy.getsockname()[1]))
        assert r.code == 1 and len(r.err_lines) == 1 and "cannot listen" in r.err


@pytest.mark.slow
def test_cli_serve_end_to_end_with_env_api_key(run_dir: Path, normal_jpeg: Path, tmp_path: Path) -> None:
    """``pneumoscan serve --backend onnx`` in its own process: key from PNEUMOSCAN_API_KEY,
    /healthz open, /v1 closed without the key, a prediction with it, clean shutdown on SIGTERM."""
    env = {**os.environ, "PNEUMOSCAN_API_KEY": "env-key-123", "MPLBACKEND": "Agg", "PNEUMOSCAN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "pneumoscan", "serve", "--checkpoint", str(run_dir), "--port", "0", "--backend", "onnx"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, (line, proc.poll())
        url = f"http://127.0.0.1:{m.group(1)}"
        with httpx.Client(base_url=url, timeout=30) as c:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if c.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, "server did not come up"
                time.sleep(0.1)
            assert c.get("/v1/model").status_code == 401
            r = _post(c, normal_jpeg.read_bytes(), headers={"Authorization": "Bearer env-key-123"}, query="?heatmap=true")
            assert r.status_code == 200 and 0 <= r.json()["probability"] <= 1
            assert r.json()["heatmap"]["method"] == "grad-cam"  # the PyTorch model explains the ONNX answers
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells how it ended
    assert proc.returncode in (0, -15), err
    assert "Application shutdown complete" in err
    assert "Traceback" not in err and "env-key-123" not in err
    assert "outcome=ok" in err and "status=401" in err
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx"))  # exported once into the cache
