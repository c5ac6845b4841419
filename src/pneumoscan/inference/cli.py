"""Sub-commands ``predict``, ``export`` and ``guard`` (``fit``, ``check``).

``pneumoscan predict PATH...`` takes files, folders (searched recursively for JPEG, PNG,
DICOM, ...) and glob patterns, and prints one answer per image in input order: the
calibrated probability of pneumonia, the label at the model's operating threshold, the
model's name and weight id; or why the file could not be read (``error``) or was refused as
not a chest X-ray (``refused``). A summary line ends the run on stderr. The exit code is 1
when any file failed (refusals are answers, not failures).
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, TextIO

from ..data.io import IMAGE_SUFFIXES
from ..errors import ConfigError, PneumoscanError
from .predictor import Prediction, Predictor

log = logging.getLogger(__name__)

#: Fewer inputs than this show no progress bar.
PROGRESS_MIN_FILES = 10
SAMPLES_DIR = "assets/samples"
_GLOB_CHARS = set("*?[")


# ----------------------------------------------------------------------------- inputs
def sample_files() -> list[Path]:
    """The sample chest X-rays bundled with pneumoscan (JPEG and DICOM), sorted."""
    d = Path(str(resources.files("pneumoscan").joinpath(SAMPLES_DIR)))
    if not d.is_dir():
        raise ConfigError(f"the bundled samples are not installed ({d} missing)")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"no sample images in {d}")
    return files


def expand_inputs(args: Iterable[str]) -> list[tuple[str, str | None]]:
    """Files, folders and glob patterns → image paths, in input order.

    Folders are searched recursively for files with an image suffix (hidden files skipped,
    sorted); patterns are expanded with ``**`` support (sorted); other arguments are kept as
    given (a missing file is reported by the reader).

    Returns:
        ``(path, None)`` per image and ``(argument, reason)`` where an argument yields nothing
        (a pattern matching no file, a folder without images), in input order.
    """
    out: list[tuple[str, str | None]] = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            found = sorted(
                str(f) for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            out += [(f, None) for f in found] or [(a, "folder holds no images (JPEG, PNG, DICOM, ...)")]
        elif not p.exists() and _GLOB_CHARS & set(a):
            found = sorted(f for f in glob.glob(a, recursive=True) if Path(f).is_file())
            out += [(f, None) for f in found] or [(a, "no file matches this pattern")]
        else:
            out.append((a, None))
    return out


# ----------------------------------------------------------------------------- output
class _Writer:
    """Prints predictions as a table, JSON lines or CSV."""

    CSV_FIELDS = ("path", "probability", "label", "threshold", "model", "weights", "guard_score", "status", "reason", "heatmap_file")

    def __init__(self, fmt: str, stream: TextIO, path_width: int, bar: Any = None) -> None:
        self.fmt = fmt
        self.stream = stream
        self.width = max(8, min(path_width, 70))
        self.bar = bar
        self.csv = csv.writer(stream, lineterminator="\n") if fmt == "csv" else None

    def _emit(self, line: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def header(self) -> None:
        if self.fmt == "table":
            self._emit(f"{'path':<{self.width}}  {'probability':>11}  label")
        elif self.csv is not None:
            self.csv.writerow(self.CSV_FIELDS)

    def row(self, p: Prediction) -> None:
        if self.fmt == "json":
            self._emit(json.dumps(p.to_dict()))
        elif self.csv is not None:
            reason = p.error or p.refused or ""
            prob = "" if p.probability is None else f"{p.probability:.6f}"
            self.csv.writerow([p.path, prob, p.label or "", f"{p.threshold:.6f}", p.model, p.extra.get("weights", ""),
                               p.extra.get("guard_score", ""), p.status, reason, p.extra.get("heatmap_file", "")])
            self.stream.flush()
        else:
            path = str(p.path)
            if len(path) > self.width:
                path = "…" + path[-(self.width - 1):]
            if p.error is not None:
                tail = f"{'-':>11}  ERROR: {p.error}"
            elif p.refused is not None:
                tail = f"{'-':>11}  REFUSED: {p.refused}"
            else:
                tail = f"{p.probability:>11.3f}  {p.label}"
            self._emit(f"{path:<{self.width}}  {tail}")


def _heatmap_saver(out_dir: Path) -> Any:
    from ..data.io import read_image
    from ..explain import resize_map, save_overlay

    used: dict[str, int] = {}

    def save(pred: Prediction) -> None:
        stem = Path(str(pred.path)).stem or "image"
        k = used.get(stem, 0) + 1
        used[stem] = k
        target = out_dir / (f"{stem}.gradcam.png" if k == 1 else f"{stem}-{k}.gradcam.png")
        try:
            full = read_image(str(pred.path))  # the original resolution (predict decoded it reduced)
        except PneumoscanError as e:
            log.warning("%s: heat map not saved (%s)", pred.path, e)
            return
        cam = resize_map(pred.heatmap, full.shape[0], full.shape[1]) if pred.heatmap is not None else None
        if cam is None:
            return
        save_overlay(target, full, cam)
        pred.extra["heatmap_file"] = str(target)

    return save


# ----------------------------------------------------------------------------- predict
def _build_predictor(args: argparse.Namespace) -> Predictor:
    from .predictor import load_predictor

    kwargs: dict[str, Any] = {"batch_size": args.batch_size, "tta": args.tta or "none", "guard": not args.no_guard}
    if args.onnx and args.checkpoint:
        raise ConfigError("give --onnx FILE or --checkpoint CKPT, not both (an exported file carries its own calibration)")
    backend = "onnx" if args.onnx else args.backend
    if backend == "auto" and args.heatmap:
        backend = "torch"  # Grad-CAM needs the PyTorch model's gradients
    return load_predictor(args.checkpoint, backend=backend, onnx=args.onnx, **kwargs)


def _cmd_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    entries = expand_inputs(args.paths or [])
    if args.samples:
        entries += [(str(p), None) for p in sample_files()]
    if not entries:
        raise ConfigError("nothing to predict: give image files, folders or glob patterns (or --samples)")
    paths = [p for p, why in entries if why is None]
    predictor = _build_predictor(args)
    heat_dir = Path(args.heatmap) if args.heatmap else None
    if heat_dir is not None:
        if predictor.model is None:
            raise ConfigError("--heatmap needs the PyTorch model: use --backend torch, or --backend onnx with --checkpoint")
        if heat_dir.exists() and not heat_dir.is_dir():
            raise ConfigError(f"--heatmap {heat_dir}: not a folder")
        heat_dir.mkdir(parents=True, exist_ok=True)
        from ..explain import resolve_layer

        resolve_layer(predictor.model, args.layer)  # unknown layer: one clear error before any work
    log.info(
        "model %s%s, threshold %.3f, backend %s%s%s", predictor.name,
        f" (weights {predictor.weights_id})" if predictor.weights_id else "", predictor.threshold,
        predictor.backend,
        f", TTA {predictor.tta}" if predictor.tta != "none" else "", "" if predictor.guard is not None else ", guard off",
    )
    stream = sys.stdout
    show_bar = not args.no_progress and len(entries) >= PROGRESS_MIN_FILES and sys.stderr.isatty()
    bar = tqdm(total=len(entries), file=sys.stderr, unit="img", disable=not show_bar, leave=False)
    writer = _Writer(args.format, stream, max(len(p) for p, _ in entries), bar)
    counts = {"ok": 0, "pneumonia": 0, "refused": 0, "error": 0}
    t0 = time.perf_counter()
    writer.header()

    def report(pred: Prediction) -> None:
        counts[pred.status] += 1
        counts["pneumonia"] += pred.label == "PNEUMONIA"
        writer.row(pred)
        if pred.error is not None and args.format != "table":
            log.error("%s: %s", pred.path, pred.error)
        bar.update(1)

    saver = _heatmap_saver(heat_dir) if heat_dir is not None else None
    stream_preds = predictor.predict_paths(paths, heatmap=heat_dir is not None, layer=args.layer, on_heatmap=saver)
    for arg, why in entries:  # answers in input order, unusable arguments in their place
        if why is not None:
            report(Prediction(arg, None, None, predictor.threshold, predictor.name, error=why))
        else:
            report(next(stream_preds))
    bar.close()
    dt = time.perf_counter() - t0
    n = len(entries)
    log.info(
        "%d predicted (%d PNEUMONIA), %d refused, %d failed; %.1f images/s", counts["ok"], counts["pneumonia"],
        counts["refused"], counts["error"], n / dt if dt > 0 else float("nan"),
    )
    return 1 if counts["error"] else 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="predict pneumonia on chest X-rays (JPEG, PNG, DICOM)",
        description="Predict pneumonia on chest X-ray files, folders (recursive) and glob patterns. Without --checkpoint "
        "the shipped default model answers. Inputs that are not chest X-rays are refused (see --no-guard).",
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files, folders or glob patterns")
    p.add_argument("--checkpoint", help="a .pt checkpoint or run directory (default: the shipped model)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table",
                   help="table (default), json (one object per line) or csv")
    p.add_argument("--heatmap", metavar="DIR", help="save Grad-CAM overlays (PNG, original resolution) into DIR")
    p.add_argument("--layer", help="Grad-CAM target layer (default: the model's; see 'pneumoscan models --json')")
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto",
                   help="auto (default: onnxruntime when installed — same probabilities as PyTorch within 1e-5, "
                        "several times faster on CPUs — else PyTorch; PyTorch with --heatmap), torch, or onnx "
                        "(the checkpoint is exported to the cache on first use)")
    p.add_argument("--onnx", metavar="FILE", help="an ONNX file from 'pneumoscan export' (implies --backend onnx)")
    p.add_argument("--tta", action="store_const", const="flip", help="test-time augmentation: average the image and its horizontal flip")
    p.add_argument("--tta-crops", dest="tta", action="store_const", const="crops",
                   help="test-time augmentation with crops: image, flip, 90%% centre crop and its flip")
    p.add_argument("--samples", action="store_true", help="predict the sample X-rays bundled with pneumoscan")
    p.add_argument("--no-guard", action="store_true", help="answer even for inputs that do not look like chest X-rays")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8: fastest on CPUs, see docs/benchmarks.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)


# ----------------------------------------------------------------------------- export
def _cmd_export(args: argparse.Namespace) -> int:
    from .onnx_export import export_onnx

    out = export_onnx(args.checkpoint, args.out, opset=args.opset, exporter=args.exporter)
    print(out)
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX (calibration and threshold in its metadata)")
    p.add_argument("--checkpoint", help="a .pt checkpoint or run directory (default: the shipped model)")
    p.add_argument("--out", required=True, help="destination .onnx file")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17, default 18)")
    p.add_argument("--exporter", choices=["auto", "dynamo", "legacy"], default="auto",
                   help="torch.export-based (dynamo), TorchScript (legacy), or auto (dynamo, then legacy)")
    p.set_defaults(func=_cmd_export)


# ----------------------------------------------------------------------------- guard
def _cmd_guard_check(args: argparse.Namespace) -> int:
    from ..guard import Guard

    guard = Guard.from_file(args.params) if args.params else Guard.default()
    failed = False
    for p, why in expand_inputs(args.paths):
        if why is not None:
            failed = True
            log.error("%s: %s", p, why)
            continue
        try:
            res = guard.check_source(p)
        except PneumoscanError as e:
            failed = True
            if args.json:
                print(json.dumps({"path": p, "error": getattr(e, "reason", str(e))}))
            else:
                print(f"{p}  ERROR: {getattr(e, 'reason', str(e))}")
            continue
        if args.json:
            print(json.dumps({"path": p, **res.to_dict()}))
        else:
            print(f"{p}  {'ok' if res.ok else 'REFUSED: ' + str(res.reason)}  (score {res.score:.3f})")
    return 1 if failed else 0


def _cmd_guard_fit(args: argparse.Namespace) -> int:
    from ..guard.core import default_guard_path
    from ..guard.fit import default_data_root, fit_guard, format_report

    data = Path(args.data) if args.data else default_data_root()
    if data is None:
        raise ConfigError("guard fit needs --data ROOT (holding chest_xray_224/ and chest_xray_fullres/)")
    out = None if args.dry_run else Path(args.out) if args.out else default_guard_path()
    report = fit_guard(data, out, seed=args.seed, limit=args.limit, progress=not args.no_progress and sys.stderr.isatty())
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "params"}, indent=2))
    else:
        print(format_report(report))
        if out is not None:
            print(f"wrote {out}")
    return 0


def _add_guard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("guard", help="the not-a-chest-X-ray guard: check images, refit it")
    p.set_defaults(func=lambda _args: (p.print_help(sys.stderr), 2)[1])
    gsub = p.add_subparsers(dest="guard_command", metavar="ACTION")
    c = gsub.add_parser("check", help="say whether images look like frontal chest X-rays")
    c.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    c.add_argument("--params", help="guard parameters JSON (default: the shipped ones)")
    c.add_argument("--json", action="store_true", help="one JSON object per line")
    c.set_defaults(func=_cmd_guard_check)
    f = gsub.add_parser("fit", help="refit the guard (needs scikit-image) and print its held-out rates")
    f.add_argument("--data", help="data root with chest_xray_224/ and chest_xray_fullres/ (default: $PNEUMOSCAN_DATA or ../shared/data)")
    f.add_argument("--out", help="where to write guard.json (default: the package's assets/guard/guard.json)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--limit", type=int, help="use at most N chest_xray_224/train images (quick check)")
    f.add_argument("--dry-run", action="store_true", help="fit and report, write nothing")
    f.add_argument("--json", action="store_true", help="print the report as JSON")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=_cmd_guard_fit)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``predict``, ``export`` and ``guard`` to the ``pneumoscan`` command."""
    _add_predict(sub)
    _add_export(sub)
    _add_guard(sub)
