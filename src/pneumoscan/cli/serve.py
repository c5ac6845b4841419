"""``pneumoscan serve``: the web service and browser page (FastAPI + uvicorn)."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
from pathlib import Path

from ..errors import ConfigError, PneumoscanError

log = logging.getLogger(__name__)

ENV_API_KEY = "PNEUMOSCAN_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` sub-command.

    Args:
        subparsers: the ``pneumoscan`` parser's sub-command action.
    """
    p = subparsers.add_parser(
        "serve", help="web service (REST API + browser page)",
        description="Serve a model over HTTP: POST /v1/predict, GET /v1/model, GET /healthz, the page at / and "
                    "the API docs at /docs (all offline). Needs the serve extra: pip install 'pneumoscan[serve]'.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    p.add_argument("--checkpoint", help="checkpoint file or run directory (default: the shipped default model)")
    p.add_argument("--backend", choices=["auto", "torch", "torch-bf16", "onnx"], default="auto",
                   help="what computes probabilities: auto (default: onnxruntime when installed, else PyTorch; same answers "
                        "within 1e-5, about twice the throughput), torch, torch-bf16 (bf16 autocast), or onnx (the checkpoint "
                        "is exported to the cache once); "
                        "Grad-CAM heatmaps come from the ONNX export's feature maps when it has them, else from the PyTorch model")
    p.add_argument("--api-key-file", metavar="PATH",
                   help=f"require the key in this file (first line) on every /v1 route; or set ${ENV_API_KEY}")
    p.add_argument("--api-key", default=None,
                   help=f"require this key on every /v1 route (visible to other users in the process list: "
                        f"prefer ${ENV_API_KEY} or --api-key-file)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="accept requests whose Host header is NAME (repeatable; '*' = any); default: the --host "
                        "address, localhost, 127.0.0.1 and ::1. Others get 400 (guards against DNS rebinding)")
    p.add_argument("--max-upload-mb", type=float, default=50.0, help="largest accepted upload in MB (default 50)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow cross-origin calls from ORIGIN (repeatable; CORS is off by default)")
    p.add_argument("--request-timeout", type=float, default=60.0, metavar="S", help="deadline of one request in seconds (default 60)")
    p.add_argument("--upload-memory-mb", type=float, default=256.0,
                   help="memory budget for uploads buffered by all requests together (default 256)")
    p.add_argument("--threads", type=int, default=2, help="decode/inference worker threads (default 2)")
    p.add_argument("--no-guard", action="store_true", help="answer every image, also those the not-a-chest-X-ray guard would refuse")
    p.add_argument("--max-connections", type=int, default=1024,
                   help="open connections (default 1024); past it the one idle the longest is closed, and new ones get 503 "
                        "only while all are busy with requests")
    p.add_argument("--header-timeout", type=float, default=5.0, metavar="S",
                   help="close connections that have not sent a complete request head within S seconds of opening or "
                        "of their previous response (default 5)")
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
    from ..serving.server import bind_socket

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be 0..65535 (got {port})")
    try:
        return bind_socket(host, port)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve --host {host!r} ({e.strerror})") from e
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e})") from e


def _api_key(args: argparse.Namespace) -> str | None:
    """The API key: --api-key-file, else $PNEUMOSCAN_API_KEY, else --api-key (with a warning:
    command lines are visible to every user of the machine)."""
    given = [name for name, v in (("--api-key-file", args.api_key_file), ("--api-key", args.api_key)) if v is not None]
    if len(given) > 1:
        raise ConfigError("give the API key once: --api-key-file or --api-key")
    if args.api_key_file is not None:
        try:
            lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read --api-key-file {args.api_key_file} ({e.__class__.__name__})") from e
        key = lines[0].strip() if lines else ""
        if not key:
            raise ConfigError(f"--api-key-file {args.api_key_file} is empty")
        return key
    if args.api_key is not None:
        log.warning("--api-key is visible to other users of this machine (ps); prefer $%s or --api-key-file", ENV_API_KEY)
        return args.api_key
    return os.environ.get(ENV_API_KEY) or None


def _allowed_hosts(args: argparse.Namespace) -> tuple[str, ...]:
    """--allowed-host values, else the bound address and the loopback names (and this
    machine's names when bound to every address)."""
    from ..serving.settings import LOOPBACK_HOSTS

    if args.allowed_host:
        return tuple(args.allowed_host)
    hosts = [*LOOPBACK_HOSTS, args.host]
    if args.host in ("0.0.0.0", "::", ""):
        hosts += [socket.gethostname(), socket.getfqdn()]
    return tuple(dict.fromkeys(h.lower() for h in hosts if h))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cmd_serve(args: argparse.Namespace) -> int:
    _check_deps()
    from ..inference import load_predictor
    from ..serving import ServeSettings, create_app
    from ..serving.server import build_server

    api_key = _api_key(args)
    settings = ServeSettings(
        max_upload_mb=args.max_upload_mb, api_key=api_key, cors_origins=tuple(args.cors_origin),
        request_timeout_s=args.request_timeout, upload_memory_mb=args.upload_memory_mb, inference_threads=args.threads,
        guard=not args.no_guard, allowed_hosts=_allowed_hosts(args), header_timeout_s=args.header_timeout,
        max_connections=args.max_connections,
    )
    settings.validate()
    sock = _bind(args.host, args.port)
    try:
        predictor = load_predictor(args.checkpoint, backend=args.backend, guard=False)  # the service applies settings.guard
        app = create_app(predictor, settings)
        if not _is_loopback(args.host) and not api_key:
            log.warning("listening on %s without an API key: anyone who can reach this address can use the service", args.host)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"pneumoscan: serving {predictor.name} on http://{shown}:{port}/  (API docs: http://{shown}:{port}/docs)", flush=True)
        log_level = "warning" if args.quiet else ("info" if args.verbose <= 0 else "debug")
        build_server(app, settings, log_level=log_level).run(sockets=[sock])
    finally:
        sock.close()
    return 0
