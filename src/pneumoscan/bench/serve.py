"""``pneumoscan benchmark serve``: request latency of the web service (``POST /v1/predict``
through a real uvicorn server on a free loopback port) for each inference backend, against
the hand-written baseline (torchvision fp32 eager, one image, no HTTP) on the same images in
the same run. ``pneumoscan benchmark load`` is the concurrency/load test; this is the per-request
latency view.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from .baseline import naive_loop
from .common import BenchReport, VariantResult, machine_info, peak_rss_mb, percentiles, reset_peak_rss
from .predict import bench_predictor

log = logging.getLogger(__name__)


class _Server:
    """uvicorn serving ``app`` from a background thread on 127.0.0.1:<free port>."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > 60 or not self.thread.is_alive():
                raise ConfigError("the benchmark's uvicorn server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Raise logger ``name`` to WARNING (the service logs every request at INFO)."""
    lg = logging.getLogger(name)
    level = lg.level
    lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(level)


def _mime(path: Path) -> str:
    return {".png": "image/png", ".dcm": "application/dicom"}.get(path.suffix.lower(), "image/jpeg")


def _run_client(url: str, paths: Sequence[Path], requests: int, concurrency: int) -> dict[str, Any]:
    """Run the HTTP client in its own process (no GIL shared with the server) and return its
    measurements."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pneumoscan.bench.serve", url, str(requests), str(concurrency), *[str(p) for p in paths]]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConfigError(f"benchmark client failed: {tail}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _client_main(argv: Sequence[str]) -> int:
    """``python -m pneumoscan.bench.serve URL N CONCURRENCY IMAGE...``: warm up, send N
    sequential uploads, then N more from CONCURRENCY threads; print one JSON line."""
    import json

    import httpx

    url, n, conc, files = argv[0], int(argv[1]), int(argv[2]), [Path(a) for a in argv[3:]]
    payloads = [(f.name, f.read_bytes(), _mime(f)) for f in files]
    server_ms: list[float] = []
    last: dict[str, Any] = {}
    with httpx.Client(base_url=url, timeout=120) as client:
        def post(i: int) -> float:
            nonlocal last
            name, data, mime = payloads[i % len(payloads)]
            t0 = time.perf_counter()
            r = client.post("/v1/predict", files={"file": (name, data, mime)})
            dt = (time.perf_counter() - t0) * 1e3
            if r.status_code != 200:
                raise SystemExit(f"/v1/predict answered {r.status_code}: {r.text[:200]}")
            last = r.json()
            timing = last.get("timing_ms") or last.get("timing") or {}
            if isinstance(timing, dict) and isinstance(timing.get("total"), (int, float)):
                server_ms.append(float(timing["total"]))
            return dt

        for i in range(2 * len(payloads)):
            post(i)
        server_ms.clear()
        t0 = time.perf_counter()
        lat = [post(i) for i in range(n)]
        seq = n / (time.perf_counter() - t0)
        seq_server = list(server_ms)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=conc) as pool:
            list(pool.map(post, range(n)))
        burst = n / (time.perf_counter() - t0)
    print(json.dumps({"latency_ms": lat, "server_ms": seq_server, "sequential_images_per_s": seq,
                      "burst_images_per_s": burst, "last": last}))
    return 0


def run_serve_benchmark(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    *,
    requests: int = 40,
    concurrency: int = 4,
    backends: Sequence[str] = ("onnx-fp32", "torch-fp32", "torch-bf16", "onnx-int8"),
    int8: str | Path | None = None,
    guard: bool = True,
    batch_size: int = 8,
) -> BenchReport:
    """Latency percentiles and throughput of ``POST /v1/predict`` per backend.

    Args:
        checkpoint: checkpoint file or run directory.
        images: uploads, sent in turn (e.g. one 2,000-px JPEG and one 224-px JPEG).
        requests: sequential requests per variant (latency percentiles).
        concurrency: clients of the throughput burst (``requests`` requests in all).
        backends: service backends (``onnx-fp32`` is what ``pneumoscan serve`` runs by
            default when onnxruntime is installed, ``torch-fp32`` with ``--backend torch``).
        int8: vetted int8 ONNX model; otherwise quantised in the run (speed only).
        guard: run the not-a-chest-X-ray guard as the service does by default.
        batch_size: Predictor batch size.
    """
    try:
        import httpx  # noqa: F401 - the client process needs it

        from ..serving import ServeSettings, create_app
    except ImportError as e:
        raise ConfigError(f"the serve benchmark needs the serve extra and httpx ({e.name} missing): pip install 'pneumoscan[serve]' httpx") from e
    import tempfile

    from ..inference.onnx_export import export_onnx
    from ..models.bundle import load_bundle
    from ..inference.quantize import preprocess_files, quantize_int8

    torch.set_flush_denormal(True)
    bundle = load_bundle(checkpoint)
    paths = [Path(p) for p in images]
    for p in paths:
        if not p.is_file():
            raise ConfigError(f"image not found: {p}")
    sizes = [(p.name, p.stat().st_size) for p in paths]
    notes: list[str] = []
    results: list[VariantResult] = []

    # baseline: the naive loop on the same files, no HTTP
    naive = naive_loop(bundle)
    for p in paths:
        naive(str(p))
    reset_peak_rss()
    lat = []
    t_all = time.perf_counter()
    for i in range(requests):
        t0 = time.perf_counter()
        naive(str(paths[i % len(paths)]))
        lat.append((time.perf_counter() - t0) * 1e3)
    results.append(VariantResult(
        name="hand-written loop (fp32 eager, no HTTP)", baseline=True, images_per_s=requests / (time.perf_counter() - t_all),
        latency_ms=percentiles(lat), peak_rss_mb=peak_rss_mb(), extra={"key": "baseline"},
    ))

    with tempfile.TemporaryDirectory(prefix="pneumoscan-bench-serve-") as tmp:
        onnx_fp32 = Path(tmp) / "model.onnx"
        for b in backends:
            kwargs: dict[str, Any] = {"batch_size": batch_size}
            if b.startswith("onnx"):
                if not onnx_fp32.is_file():
                    export_onnx(checkpoint, onnx_fp32)
                if b == "onnx-int8":
                    path = Path(int8) if int8 else Path(tmp) / "model.int8.onnx"
                    if not int8 and not path.is_file():
                        from ..data.datasets import Sample

                        xc, _ = preprocess_files([Sample(str(p), 0, "") for p in paths], bundle.input_size)
                        quantize_int8(onnx_fp32, path, np.repeat(xc, max(1, 16 // len(xc)), axis=0))
                        notes.append("int8 model quantised in this run from the upload images (speed only)")
                    kwargs["onnx"] = path
                else:
                    kwargs["onnx"] = onnx_fp32
            predictor = bench_predictor(checkpoint, b, **kwargs)
            app = create_app(predictor, ServeSettings(guard=guard, inference_threads=2))
            with _quiet("pneumoscan.serving"), _Server(app) as srv:
                reset_peak_rss()
                res = _run_client(srv.url, paths, requests, concurrency)
            lat, server_ms, body = res["latency_ms"], res["server_ms"], res["last"]
            seq_ips, burst_ips = res["sequential_images_per_s"], res["burst_images_per_s"]
            server_pct = percentiles(server_ms) if server_ms else {}
            results.append(VariantResult(
                name=f"service /v1/predict, {b}", images_per_s=seq_ips, latency_ms=percentiles(lat), peak_rss_mb=peak_rss_mb(),
                extra={"key": b, "concurrent_images_per_s": burst_ips, "concurrency": concurrency, "server_total_ms": server_pct,
                       "server_timing_ms": body.get("timing") or body.get("timing_ms"), "probability": body.get("probability")},
            ))
    notes.append(f"uploads: {', '.join(f'{n} ({b / 1e3:.0f} kB)' for n, b in sizes)}; guard {'on' if guard else 'off'}; "
                 f"img/s = sequential requests from a client process (httpx) to the server's uvicorn thread")
    for v in results:
        if v.extra.get("server_total_ms"):
            sp = v.extra["server_total_ms"]
            notes.append(f"{v.name}: server-side time (decode+guard+inference) p50 {sp['p50']:.1f} ms, p95 {sp['p95']:.1f} ms; "
                         f"{concurrency}-client burst {v.extra['concurrent_images_per_s']:.1f} img/s")
    report = BenchReport(
        benchmark="serve", title=f"{requests} sequential POST /v1/predict per backend (+ {concurrency}-client burst)",
        machine=machine_info(), settings={"checkpoint": str(bundle.path), "requests": requests, "guard": guard},
        variants=results, notes=notes,
    ).finish()
    fast = [v for v in report.variants if not v.baseline and v.latency_ms]
    if fast:
        best = min(fast, key=lambda v: v.latency_ms["p50"])
        report.targets.append({"what": f"served latency p50, {best.name}", "measured": f"{best.latency_ms['p50']:.1f} ms",
                               "goal": "<= 50 ms (2,000-px JPEG, warm)", "met": best.latency_ms["p50"] <= 50.0})
    return report


if __name__ == "__main__":
    import sys

    sys.exit(_client_main(sys.argv[1:]))
