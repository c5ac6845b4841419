"""Storm mode of ``pneumoscan benchmark load``: many concurrent large uploads while
``/healthz`` is probed from a separate process and the server's resident memory is sampled.
Also the helpers both modes share (status of an answer, percentiles, a process's RSS).
"""
from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MAX_BIG = 200  # storm size cap
MAX_SIZE_MB = 45.0  # storm upload size cap (below the server's default 50 MB limit)
#: The /healthz prober run in a child process (``python -c _PROBE URL``).
_PROBE = "import sys; from pneumoscan.bench.storm import probe_healthz; sys.exit(probe_healthz(sys.argv[1]))"


def rss_bytes(pid: int) -> tuple[int | None, int | None]:
    """(current RSS, peak RSS) of a process in bytes, from /proc (psutil as a fallback)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
        vals = {k: int(v.split()[0]) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(.+)$", text, re.M)}
        return vals.get("VmRSS"), vals.get("VmHWM")
    except OSError:
        try:
            import psutil

            return psutil.Process(pid).memory_info().rss, None
        except Exception:  # noqa: BLE001 - memory figures are optional
            return None, None



# ----------------------------------------------------------------------------- payloads
def big_jpeg(source: Path, size_mb: float) -> bytes:
    """A real X-ray upscaled with film-grain noise and saved as a JPEG of about ``size_mb``
    MB (a large, valid, decodable radiograph, like an uncompressed-quality scan)."""
    from PIL import Image

    target = size_mb * 1_000_000
    with Image.open(source) as im:
        base = im.convert("L")
    rng = np.random.default_rng(0)
    side = 2000
    for _ in range(8):
        w = side
        h = int(side * base.height / base.width)
        arr = np.asarray(base.resize((w, h), Image.BILINEAR), dtype=np.int16)
        arr = np.clip(arr + rng.normal(0, 18, arr.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=97)
        data = buf.getvalue()
        if abs(len(data) - target) / target < 0.06:
            return data
        side = int(side * (target / len(data)) ** 0.5)
    return data


def outcome(r: Any) -> str:
    """``"200"``, ``"200 refused"`` (the guard said: not a chest X-ray) or the error status."""
    if r.status_code == 200 and r.json().get("refused"):
        return "200 refused"
    return str(r.status_code)


def percentile(xs: list[float], q: float) -> float:
    """The ``q``-th percentile of ``xs`` (NaN when empty)."""
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


# ----------------------------------------------------------------------------- storm mode
async def storm(client: Any, url: str, data: bytes, count: int, headers: dict[str, str], timeout: float, pid: int | None,
                query: str = "") -> dict[str, Any]:
    """``count`` concurrent uploads of ``data`` while /healthz is probed and the server's RSS sampled."""
    import httpx

    codes: dict[str, int] = {}
    lat: list[float] = []
    stages: dict[str, list[float]] = {}
    rss_samples: list[int] = []
    done = asyncio.Event()
    base_rss, base_hwm = rss_bytes(pid) if pid else (None, None)

    async def upload() -> None:
        t0 = time.perf_counter()
        try:
            r = await client.post(url + "/v1/predict" + query, files={"file": ("big.jpeg", data, "image/jpeg")}, headers=headers, timeout=timeout)
            key = outcome(r)
        except httpx.HTTPError as e:
            key = e.__class__.__name__
        codes[key] = codes.get(key, 0) + 1
        if key.startswith("200"):
            lat.append(time.perf_counter() - t0)
            for k, v in r.json().get("timing_ms", {}).items():
                stages.setdefault(k, []).append(v)

    # /healthz is probed from a separate process, so that the upload client's own work
    # (building 100 large multipart bodies) does not show up as server latency
    prober = subprocess.Popen([sys.executable, "-c", _PROBE, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    async def sample_rss() -> None:
        while not done.is_set() and pid:
            cur, _ = rss_bytes(pid)
            if cur:
                rss_samples.append(cur)
            await asyncio.sleep(0.05)

    side = [asyncio.create_task(sample_rss())]
    t0 = time.perf_counter()
    await asyncio.gather(*(upload() for _ in range(count)))
    wall = time.perf_counter() - t0
    done.set()
    await asyncio.gather(*side)
    probe_out, _ = prober.communicate(input="stop\n", timeout=30)
    probe_res = json.loads(probe_out or "{}")
    health, health_fail = probe_res.get("latencies", []), probe_res.get("failures", {})
    _, hwm = rss_bytes(pid) if pid else (None, None)
    mb = 1 / 1_000_000
    return {
        "uploads": count, "upload_mb": round(len(data) * mb, 2), "status": codes, "wall_s": round(wall, 2),
        "upload_throughput_mb_s": round(len(lat) * len(data) * mb / wall, 1) if wall > 0 else None,
        "latency_p50_s": round(percentile(lat, 50), 2), "latency_max_s": round(max(lat), 2) if lat else None,
        "server_rss_before_mb": round(base_rss * mb, 1) if base_rss else None,
        "server_rss_peak_sampled_mb": round(max(rss_samples) * mb, 1) if rss_samples else None,
        "server_rss_high_water_mb": round(hwm * mb, 1) if hwm else None,
        "server_rss_high_water_before_mb": round(base_hwm * mb, 1) if base_hwm else None,
        "server_stage_mean_ms": {k: round(float(np.mean(v)), 1) for k, v in stages.items()},
        "healthz_probes": len(health), "healthz_failures": health_fail,
        "healthz_p50_ms": round(1000 * percentile(health, 50), 1), "healthz_p95_ms": round(1000 * percentile(health, 95), 1),
        "healthz_max_ms": round(1000 * max(health), 1) if health else None,
    }


def probe_healthz(url: str) -> int:
    """Child-process mode: GET /healthz every 100 ms until a line arrives on stdin, then print
    {"latencies": [...], "failures": {...}} as JSON."""
    import threading

    import httpx

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    lat: list[float] = []
    fail: dict[str, int] = {}
    with httpx.Client(timeout=10) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = c.get(url + "/healthz")
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t0)
                else:
                    fail[str(r.status_code)] = fail.get(str(r.status_code), 0) + 1
            except httpx.HTTPError as e:
                fail[e.__class__.__name__] = fail.get(e.__class__.__name__, 0) + 1
            stop.wait(0.1)
    print(json.dumps({"latencies": lat, "failures": fail}))
    return 0
