"""``pneumoscan serve``: the web service and browser page (FastAPI + uvicorn)."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket

from ..errors import ConfigError, PneumoscanError

log = logging.getLogger(__name__)

ENV_API_KEY = "PNEUMOSCAN_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` sub-command.

    Args:
        subparsers: the CLI's sub-parser collection.
    """
    p = subparsers.add_parser(
        "serve", help="web service (REST API + browser page)",
        description="Serve a model over HTTP: POST /v1/predict, GET /v1/model, GET /healthz, the page at / and "
                    "the API docs at /docs (all offline). Needs the serve extra: pip install 'pneumoscan[serve]'.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    p.add_argument("--checkpoint", help="checkpoint file or run directory (default: the shipped default model)")
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto",
                   help="what computes probabilities: auto (default: onnxruntime when installed, else PyTorch; same answers "
                        "within 1e-5, about twice the throughput), torch, or onnx (the checkpoint is exported to the cache once); "
                        "Grad-CAM heatmaps always use the PyTorch model")
    p.add_argument("--api-key", default=None, help=f"require this key on every /v1 route (default: ${ENV_API_KEY} if set)")
    p.add_argument("--max-upload-mb", type=float, default=50.0, help="largest accepted upload in MB (default 50)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow cross-origin calls from ORIGIN (repeatable; CORS is off by default)")
    p.add_argument("--request-timeout", type=float, default=60.0, metavar="S", help="deadline of one request in seconds (default 60)")
    p.add_argument("--upload-memory-mb", type=float, default=256.0,
                   help="memory budget for uploads buffered by all requests together (default 256)")
    p.add_argument("--threads", type=int, default=2, help="decode/inference worker threads (default 2)")
    p.add_argument("--no-guard", action="store_true", help="answer every image, also those the not-a-chest-X-ray guard would refuse")
    p.add_argument("--max-connections", type=int, default=1024, help="open connections before new ones get 503 (default 1024)")
    p.set_defaults(func=_cmd_serve)


def _check_deps() -> None:
    missing = []
    for mod in ("fastapi", "uvicorn", "python_multipart", "fastapi_offline"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise PneumoscanError(f"the web service needs {', '.join(missing)}: pip install 'pneumoscan[serve]'")


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves so that a busy port is one clear error line."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be 0..65535 (got {port})")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve --host {host!r} ({e.strerror})") from e
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e})") from e
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cmd_serve(args: argparse.Namespace) -> int:
    _check_deps()
    import uvicorn

    from ..inference import load_predictor
    from .app import ServeSettings, create_app

    api_key = args.api_key if args.api_key is not None else os.environ.get(ENV_API_KEY) or None
    settings = ServeSettings(
        max_upload_mb=args.max_upload_mb, api_key=api_key, cors_origins=tuple(args.cors_origin),
        request_timeout_s=args.request_timeout, upload_memory_mb=args.upload_memory_mb, inference_threads=args.threads,
        guard=not args.no_guard,
    )
    settings.validate()
    if args.max_connections < 1:
        raise ConfigError("--max-connections must be >= 1")
    sock = _bind(args.host, args.port)
    try:
        predictor = load_predictor(args.checkpoint, backend=args.backend)
        app = create_app(predictor, settings)
        if not _is_loopback(args.host) and not api_key:
            log.warning("listening on %s without an API key: anyone who can reach this address can use the service", args.host)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"pneumoscan: serving {predictor.name} on http://{shown}:{port}/  (API docs: http://{shown}:{port}/docs)", flush=True)
        config = uvicorn.Config(
            app, log_level="warning" if args.quiet else ("info" if args.verbose <= 0 else "debug"), access_log=False, timeout_keep_alive=5,
            limit_concurrency=args.max_connections, timeout_graceful_shutdown=10, server_header=False,
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
