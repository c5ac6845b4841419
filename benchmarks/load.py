"""Load test of ``pneumoscan serve`` on the loopback interface.

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

Examples::

    python benchmarks/load.py --checkpoint runs/mobilenet --n 1,8,32
    python benchmarks/load.py --checkpoint runs/mobilenet --big 100 --size-mb 20
"""
from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = REPO / "tests" / "fixtures" / "fullres" / "NORMAL2-IM-1438-0001.jpeg"
MAX_LEVEL = 256  # concurrency cap
MAX_BIG = 200  # storm size cap
MAX_SIZE_MB = 45.0  # storm upload size cap (below the server's default 50 MB limit)


# ----------------------------------------------------------------------------- server handling
def _check_loopback(url: str) -> str:
    """Return ``url`` without a trailing slash; refuse anything that is not loopback."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    ok = host == "localhost"
    if not ok:
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = False
    if parts.scheme not in ("http", "https") or not ok:
        raise SystemExit(f"error: --url must be an http(s) URL on a loopback address (got {url!r})")
    return url.rstrip("/")


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
            raise SystemExit(f"error: the server did not start: {(err or line).strip().splitlines()[-1] if (err or line).strip() else 'no output'}")
        self.url = f"http://127.0.0.1:{m.group(1)}"
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


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


async def wait_healthy(client: Any, url: str, timeout: float = 120.0) -> dict[str, Any]:
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
            raise SystemExit(f"error: {url}/healthz did not answer within {timeout:.0f} s")
        await asyncio.sleep(0.2)


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


def _outcome(r: Any) -> str:
    """``"200"``, ``"200 refused"`` (the guard said: not a chest X-ray) or the error status."""
    if r.status_code == 200 and r.json().get("refused"):
        return "200 refused"
    return str(r.status_code)


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


# ----------------------------------------------------------------------------- latency mode
async def latency_level(client: Any, url: str, data: bytes, n: int, headers: dict[str, str], timeout: float, query: str = "") -> dict[str, Any]:
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
                key = _outcome(r)
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


# ----------------------------------------------------------------------------- storm mode
async def storm(client: Any, url: str, data: bytes, count: int, headers: dict[str, str], timeout: float, pid: int | None,
                query: str = "") -> dict[str, Any]:
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
            key = _outcome(r)
        except httpx.HTTPError as e:
            key = e.__class__.__name__
        codes[key] = codes.get(key, 0) + 1
        if key.startswith("200"):
            lat.append(time.perf_counter() - t0)
            for k, v in r.json().get("timing_ms", {}).items():
                stages.setdefault(k, []).append(v)

    # /healthz is probed from a separate process, so that the upload client's own work
    # (building 100 large multipart bodies) does not show up as server latency
    prober = subprocess.Popen([sys.executable, __file__, "--probe-healthz", url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

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


# ----------------------------------------------------------------------------- main
async def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    server = None
    pid = args.server_pid
    if args.url:
        url = _check_loopback(args.url)
    else:
        extra = ["--request-timeout", str(args.timeout)]
        if args.max_upload_mb:
            extra += ["--max-upload-mb", str(args.max_upload_mb)]
        if args.backend:
            extra += ["--backend", args.backend]
        server = Server(args.checkpoint, extra)
        url, pid = server.url, server.pid
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    query = "?heatmap=true" if args.heatmap else ""
    out: dict[str, Any] = {"url": url, "heatmap": args.heatmap, "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    limits = httpx.Limits(max_connections=MAX_BIG + MAX_LEVEL, max_keepalive_connections=MAX_LEVEL)
    try:
        async with httpx.AsyncClient(limits=limits, timeout=args.timeout) as client:
            await wait_healthy(client, url)
            info = (await client.get(url + "/v1/model", headers=headers)).json()
            out["model"] = info.get("name")
            out["model_architecture"] = info.get("model_name")
            if args.big:
                data = big_jpeg(Path(args.image or DEFAULT_IMAGE), args.size_mb)
                await latency_level(client, url, (Path(args.image or DEFAULT_IMAGE)).read_bytes(), 1, headers, args.timeout)  # warm-up
                out["storm"] = await storm(client, url, data, args.big, headers, args.timeout, pid, query)
            else:
                data = Path(args.image or DEFAULT_IMAGE).read_bytes()
                out["image_bytes"] = len(data)
                for _ in range(3):  # warm-up
                    await client.post(url + "/v1/predict", files={"file": ("x.jpeg", data, "image/jpeg")}, headers=headers)
                out["levels"] = [await latency_level(client, url, data, n, headers, args.timeout, query) for n in args.n]
            if pid:
                cur, hwm = rss_bytes(pid)
                out["server_rss_end_mb"] = round(cur / 1e6, 1) if cur else None
    finally:
        if server is not None:
            server.stop()
    return out


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--n expects comma-separated integers, got {text!r}") from None
    if not levels or any(n < 1 or n > MAX_LEVEL for n in levels):
        raise argparse.ArgumentTypeError(f"--n levels must be 1..{MAX_LEVEL}")
    return levels


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="running server on a loopback address (default: start one)")
    p.add_argument("--server-pid", type=int, help="pid of the server at --url, to report its memory")
    p.add_argument("--checkpoint", help="checkpoint for the server this script starts (default: shipped default model)")
    p.add_argument("--api-key", default=os.environ.get("PNEUMOSCAN_API_KEY"), help="API key, if the server needs one")
    p.add_argument("--image", help=f"X-ray to upload (default: {DEFAULT_IMAGE.relative_to(REPO)})")
    p.add_argument("--n", type=_levels, default=[1, 8, 32], help="concurrency levels, e.g. 1,8,32")
    p.add_argument("--big", type=int, default=0, help=f"storm mode: this many concurrent large uploads (max {MAX_BIG})")
    p.add_argument("--size-mb", type=float, default=20.0, help=f"storm upload size in MB (max {MAX_SIZE_MB:g})")
    p.add_argument("--max-upload-mb", type=float, help="--max-upload-mb of the server this script starts")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds (also the server's deadline)")
    p.add_argument("--heatmap", action="store_true", help="ask for a Grad-CAM heatmap with every prediction")
    p.add_argument("--backend", choices=["torch", "onnx", "auto"], help="--backend of the server this script starts (default: serve's)")
    p.add_argument("--json", action="store_true", help="print the results as JSON only")
    p.add_argument("--probe-healthz", metavar="URL", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe_healthz:
        return probe_healthz(_check_loopback(args.probe_healthz))
    if not 0 <= args.big <= MAX_BIG:
        p.error(f"--big must be 0..{MAX_BIG}")
    if not 0 < args.size_mb <= MAX_SIZE_MB:
        p.error(f"--size-mb must be in (0, {MAX_SIZE_MB:g}]")
    if not 0 < args.timeout <= 600:
        p.error("--timeout must be in (0, 600]")
    res = asyncio.run(run(args))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"server {res['url']}  model {res.get('model')} ({res.get('model_architecture')})  heatmaps {'on' if res['heatmap'] else 'off'}  "
          f"{res['cpu_count']} CPUs, load average {res['load_avg_1m']:.2f}")
    for lv in res.get("levels", []):
        print(f"N={lv['concurrency']:>3}  {lv['requests']:>4} requests  {lv['throughput_rps']:>7.2f} req/s  "
              f"p50 {lv['p50_ms']:>8.1f} ms  p95 {lv['p95_ms']:>8.1f} ms  p99 {lv['p99_ms']:>8.1f} ms  status {lv['status']}")
    if "storm" in res:
        s = res["storm"]
        print(f"storm: {s['uploads']} concurrent uploads of {s['upload_mb']} MB in {s['wall_s']} s "
              f"({s['upload_throughput_mb_s']} MB/s answered), status {s['status']}")
        print(f"  latency p50 {s['latency_p50_s']} s, max {s['latency_max_s']} s; server stages (mean ms): {s['server_stage_mean_ms']}")
        print(f"  server RSS: before {s['server_rss_before_mb']} MB, peak sampled {s['server_rss_peak_sampled_mb']} MB, "
              f"high-water mark {s['server_rss_high_water_mb']} MB")
        print(f"  /healthz during the storm: {s['healthz_probes']} probes, p50 {s['healthz_p50_ms']} ms, "
              f"p95 {s['healthz_p95_ms']} ms, max {s['healthz_max_ms']} ms, failures {s['healthz_failures'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
