"""``pneumoscan benchmark load``: load test of ``pneumoscan serve`` on the loopback interface.

Latency mode (default): for each concurrency level N in ``--n`` (e.g. ``1,8,32``), send
``max(4N, 16)`` uploads of a real chest X-ray with at most N in flight and print throughput
and p50/p95/p99 latency.

Storm mode (``--big 100 --size-mb 20``): send 100 concurrent uploads of a real X-ray
re-encoded as a ~20 MB JPEG, while /healthz is probed every 100 ms and the server's resident
memory is sampled; print the status codes seen, the server's peak RSS and /healthz latency
during the storm.

Without ``--url`` a server is started on a free 127.0.0.1 port (``pneumoscan serve
--checkpoint CKPT``; without ``--checkpoint``, the shipped default model) and stopped at the
end. Only loopback addresses are accepted; request counts and time are bounded.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from ..errors import ConfigError
from .storm import MAX_BIG, MAX_SIZE_MB, big_jpeg, outcome, percentile, rss_bytes, storm

#: The X-ray uploaded by default (one of the bundled samples).
DEFAULT_IMAGE_NAME = "NORMAL2-IM-1438-0001.jpeg"
MAX_LEVEL = 256  # concurrency cap
MAX_TIMEOUT_S = 600.0  # per-request timeout cap


# ----------------------------------------------------------------------------- server handling
def check_loopback(url: str) -> str:
    """Return ``url`` without a trailing slash; refuse anything that is not loopback.

    Args:
        url: an ``http(s)://`` URL.

    Raises:
        ConfigError: the URL is not http(s) on a loopback address.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    ok = host == "localhost"
    if not ok:
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = False
    if parts.scheme not in ("http", "https") or not ok:
        raise ConfigError(f"--url must be an http(s) URL on a loopback address (got {url!r})")
    return url.rstrip("/")


def default_image() -> Path:
    """The bundled sample X-ray uploaded when no ``--image`` is given."""
    return Path(str(resources.files("pneumoscan").joinpath("assets", "samples", DEFAULT_IMAGE_NAME)))


class Server:
    """``pneumoscan serve`` in a child process on a free 127.0.0.1 port.

    Args:
        checkpoint: checkpoint file or run directory (None: shipped default model).
        extra: further ``serve`` arguments.
    """

    def __init__(self, checkpoint: str | None, extra: list[str]) -> None:
        cmd = [sys.executable, "-m", "pneumoscan", "-q", "serve", "--host", "127.0.0.1", "--port", "0", *extra]
        if checkpoint:
            cmd += ["--checkpoint", checkpoint]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "MPLBACKEND": "Agg"})
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not m:
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""  # type: ignore[union-attr]
            self.stop()
            raise ConfigError(f"the server did not start: {(err or line).strip().splitlines()[-1] if (err or line).strip() else 'no output'}")
        self.url = f"http://127.0.0.1:{m.group(1)}"
        self.pid = self.proc.pid

    def stop(self) -> None:
        """Terminate the server (kill it after 30 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def wait_healthy(client: Any, url: str, timeout: float = 120.0) -> dict[str, Any]:
    """Poll ``/healthz`` until it answers 200 (ConfigError after ``timeout`` seconds)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            r = await client.get(url + "/healthz")
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise ConfigError(f"{url}/healthz did not answer within {timeout:.0f} s")
        await asyncio.sleep(0.2)


# ----------------------------------------------------------------------------- latency mode
async def latency_level(client: Any, url: str, data: bytes, n: int, headers: dict[str, str], timeout: float, query: str = "") -> dict[str, Any]:
    """Send ``max(4n, 16)`` uploads with at most ``n`` in flight: throughput and latency percentiles."""
    import httpx

    total = max(4 * n, 16)
    sem = asyncio.Semaphore(n)
    lat: list[float] = []
    codes: dict[str, int] = {}

    async def one() -> None:
        async with sem:
            t0 = time.perf_counter()
            try:
                r = await client.post(url + "/v1/predict" + query, files={"file": ("xray.jpeg", data, "image/jpeg")}, headers=headers, timeout=timeout)
                key = outcome(r)
            except httpx.HTTPError as e:
                key = e.__class__.__name__
            dt = time.perf_counter() - t0
            codes[key] = codes.get(key, 0) + 1
            if key.startswith("200"):
                lat.append(dt)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(total)))
    wall = time.perf_counter() - t0
    return {
        "concurrency": n, "requests": total, "status": codes, "wall_s": round(wall, 3),
        "throughput_rps": round(len(lat) / wall, 2) if wall > 0 else None,
        "p50_ms": round(1000 * percentile(lat, 50), 1), "p95_ms": round(1000 * percentile(lat, 95), 1),
        "p99_ms": round(1000 * percentile(lat, 99), 1),
    }


# ----------------------------------------------------------------------------- run
def run_load_test(
    *, url: str | None = None, server_pid: int | None = None, checkpoint: str | None = None, api_key: str | None = None,
    image: str | Path | None = None, levels: Sequence[int] = (1, 8, 32), big: int = 0, size_mb: float = 20.0,
    max_upload_mb: float | None = None, timeout: float = 120.0, heatmap: bool = False, backend: str | None = None,
) -> dict[str, Any]:
    """Load-test a ``pneumoscan serve`` on a loopback address (started here unless ``url``).

    Args:
        url: a running server (default: start one on a free 127.0.0.1 port, stop it at the end).
        server_pid: pid of the server at ``url``, to report its memory.
        checkpoint: checkpoint of the server started here (default: the shipped model).
        api_key: sent as ``X-API-Key`` when given.
        image: the X-ray to upload (default: :func:`default_image`).
        levels: concurrency levels of latency mode (1..:data:`MAX_LEVEL`).
        big: storm mode: this many concurrent large uploads (0 = latency mode).
        size_mb: storm upload size in MB.
        max_upload_mb: ``--max-upload-mb`` of the server started here.
        timeout: per-request timeout in seconds (also the server's request deadline).
        heatmap: ask for a Grad-CAM heatmap with every prediction.
        backend: ``--backend`` of the server started here (default: serve's).

    Returns:
        url, model, machine figures and ``levels`` (latency mode) or ``storm`` (storm mode).
    """
    if not levels or any(n < 1 or n > MAX_LEVEL for n in levels):
        raise ConfigError(f"--n levels must be 1..{MAX_LEVEL}")
    if not 0 <= big <= MAX_BIG:
        raise ConfigError(f"--big must be 0..{MAX_BIG}")
    if not 0 < size_mb <= MAX_SIZE_MB:
        raise ConfigError(f"--size-mb must be in (0, {MAX_SIZE_MB:g}]")
    if not 0 < timeout <= MAX_TIMEOUT_S:
        raise ConfigError(f"--timeout must be in (0, {MAX_TIMEOUT_S:g}]")
    return asyncio.run(_run(url, server_pid, checkpoint, api_key, Path(image or default_image()), list(levels), big, size_mb,
                            max_upload_mb, timeout, heatmap, backend))


async def _run(url: str | None, pid: int | None, checkpoint: str | None, api_key: str | None, image: Path, levels: list[int],
               big: int, size_mb: float, max_upload_mb: float | None, timeout: float, heatmap: bool,
               backend: str | None) -> dict[str, Any]:
    import httpx

    server = None
    if url:
        url = check_loopback(url)
    else:
        extra = ["--request-timeout", str(timeout)]
        if max_upload_mb:
            extra += ["--max-upload-mb", str(max_upload_mb)]
        if backend:
            extra += ["--backend", backend]
        server = Server(checkpoint, extra)
        url, pid = server.url, server.pid
    headers = {"X-API-Key": api_key} if api_key else {}
    query = "?heatmap=true" if heatmap else ""
    out: dict[str, Any] = {"url": url, "heatmap": heatmap, "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    limits = httpx.Limits(max_connections=MAX_BIG + MAX_LEVEL, max_keepalive_connections=MAX_LEVEL)
    try:
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            await wait_healthy(client, url)
            info = (await client.get(url + "/v1/model", headers=headers)).json()
            out["model"] = info.get("name")
            out["model_architecture"] = info.get("model_name")
            if big:
                data = big_jpeg(image, size_mb)
                await latency_level(client, url, image.read_bytes(), 1, headers, timeout)  # warm-up
                out["storm"] = await storm(client, url, data, big, headers, timeout, pid, query)
            else:
                data = image.read_bytes()
                out["image_bytes"] = len(data)
                for _ in range(3):  # warm-up
                    await client.post(url + "/v1/predict", files={"file": ("x.jpeg", data, "image/jpeg")}, headers=headers)
                out["levels"] = [await latency_level(client, url, data, n, headers, timeout, query) for n in levels]
            if pid:
                cur, hwm = rss_bytes(pid)
                out["server_rss_end_mb"] = round(cur / 1e6, 1) if cur else None
    finally:
        if server is not None:
            server.stop()
    return out


def format_load_report(res: dict[str, Any]) -> str:
    """The human-readable summary of :func:`run_load_test`'s result.

    Args:
        res: what :func:`run_load_test` returned.
    """
    lines = [f"server {res['url']}  model {res.get('model')} ({res.get('model_architecture')})  heatmaps {'on' if res['heatmap'] else 'off'}  "
             f"{res['cpu_count']} CPUs, load average {res['load_avg_1m']:.2f}"]
    for lv in res.get("levels", []):
        lines.append(f"N={lv['concurrency']:>3}  {lv['requests']:>4} requests  {lv['throughput_rps']:>7.2f} req/s  "
                     f"p50 {lv['p50_ms']:>8.1f} ms  p95 {lv['p95_ms']:>8.1f} ms  p99 {lv['p99_ms']:>8.1f} ms  status {lv['status']}")
    if "storm" in res:
        s = res["storm"]
        lines += [
            f"storm: {s['uploads']} concurrent uploads of {s['upload_mb']} MB in {s['wall_s']} s "
            f"({s['upload_throughput_mb_s']} MB/s answered), status {s['status']}",
            f"  latency p50 {s['latency_p50_s']} s, max {s['latency_max_s']} s; server stages (mean ms): {s['server_stage_mean_ms']}",
            f"  server RSS: before {s['server_rss_before_mb']} MB, peak sampled {s['server_rss_peak_sampled_mb']} MB, "
            f"high-water mark {s['server_rss_high_water_mb']} MB",
            f"  /healthz during the storm: {s['healthz_probes']} probes, p50 {s['healthz_p50_ms']} ms, "
            f"p95 {s['healthz_p95_ms']} ms, max {s['healthz_max_ms']} ms, failures {s['healthz_failures'] or 'none'}",
        ]
    return "\n".join(lines)
