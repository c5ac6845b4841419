"""``pneumoscan predict``: predict pneumonia on files, folders, glob patterns or the bundled samples.

``pneumoscan predict PATH...`` takes files, folders (searched recursively for JPEG, PNG,
DICOM, ...) and glob patterns, and prints one answer per image in input order: the
calibrated probability of pneumonia, the label at the model's operating threshold, the
model's name and weight id; or why the file could not be read (``error``) or was refused as
not a chest X-ray (``refused``). A summary line ends the run on stderr. The exit code is 1
when any file failed or any heat map could not be written (refusals are answers, not
failures); the rows of the images that were scored are printed all the same.

Output safety: the table and CSV show text from the data (file names, reasons quoting DICOM
attributes) escaped by :func:`~pneumoscan.utils.text.safe_text` (``\\x0a``, ``\\x1b``: one row
per image, no terminal escape codes), and a CSV text cell that starts with ``= + - @`` (or a
tab or carriage return) gets a leading ``'`` so that spreadsheets show it instead of running
it as a formula. JSON lines are exact (JSON escapes control characters itself).

Heat maps (``--heatmap DIR``) are named after each input file (``x.gradcam.png``); inputs
whose names would clash (``a/x.jpg``, ``b/x.jpg``) get a short hash of their path
(``x-1a2b3c4d.gradcam.png``), so every input file has its own file. Files already in DIR are
never replaced silently: predict refuses before any work unless ``--overwrite`` is given.
"""
from __future__ import annotations

import argparse
import glob
import logging
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..data.io import IMAGE_SUFFIXES
from ..data.limits import DECODE_MEMORY
from ..errors import ConfigError
from ..explain.figure import HEATMAP_STYLES
from ..inference import Prediction, Predictor
from ..utils.text import safe_text
from .predict_outputs import CELL_LIMIT, _Writer, _dicom_writer, _heatmap_saver, _prepare_heatmap_dir, heatmap_names

log = logging.getLogger(__name__)

#: Fewer inputs than this show no progress bar.
PROGRESS_MIN_FILES = 10
SAMPLES_DIR = "assets/samples"
_GLOB_CHARS = set("*?[")
#: Default ``--decode-timeout``: seconds one file may take to decode (in a worker process).
DECODE_TIMEOUT_S = 30.0


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


# ----------------------------------------------------------------------------- predict
def run_summary(counts: Mapping[str, int], seconds: float) -> str:
    """The summary line of a run: what was predicted, refused and unreadable; a throughput only
    when images were scored (a run where every file failed measured nothing).

    Args:
        counts: ``ok``, ``pneumonia``, ``refused`` and ``error`` counts.
        seconds: the run's wall time.
    """
    scored = counts["ok"] + counts["refused"]
    failed = counts["error"]
    unreadable = f"{failed} file{'s' if failed != 1 else ''} could not be read"
    if not scored:
        return f"nothing predicted: {unreadable}" if failed else "nothing predicted"
    rate = f"{scored / seconds:.1f} images/s" if seconds > 0 else "time not measured"
    return f"{counts['ok']} predicted ({counts['pneumonia']} PNEUMONIA), {counts['refused']} refused, {failed} failed; {rate}"


def seen_summary(n_seen: int, n_inputs: int) -> str:
    """The line saying how many inputs the model was trained or calibrated on.

    Args:
        n_seen: inputs recognised as the model's training or calibration images.
        n_inputs: all inputs.
    """
    return (f"{n_seen} of {n_inputs} input{'s' if n_inputs != 1 else ''} {'were' if n_seen != 1 else 'was'} among this model's "
            "training/calibration images: their results say nothing about its performance")


def _build_predictor(args: argparse.Namespace) -> Predictor:
    from ..inference import load_predictor

    kwargs: dict[str, Any] = {"batch_size": args.batch_size, "tta": args.tta or "none", "guard": not args.no_guard}
    if args.onnx and args.checkpoint:
        raise ConfigError("give --onnx FILE or --checkpoint CKPT, not both (an exported file carries its own calibration)")
    backend = "onnx" if args.onnx else args.backend
    return load_predictor(args.checkpoint, backend=backend, onnx=args.onnx, **kwargs)


def _cmd_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    entries = expand_inputs(args.paths or [])
    if args.samples:
        entries += [(str(p), None) for p in sample_files()]
    if not entries:
        raise ConfigError("nothing to predict: give image files, folders or glob patterns (or --samples)")
    paths = [p for p, why in entries if why is None]
    if args.decode_timeout and paths:
        from ..data.decode_pool import DECODE_NICE
        from ..data.isolated import start_decoders

        # the decoding workers start while the model loads, at a lower priority than its threads
        start_decoders(nice=DECODE_NICE)
    predictor = _build_predictor(args)
    heat_dir = Path(args.heatmap) if args.heatmap else None
    heat_names = heatmap_names(paths) if heat_dir is not None else {}
    dicom_out = _dicom_writer(args.output_dicom) if args.output_dicom else None
    maps = heat_dir is not None or dicom_out is not None
    if heat_dir is not None:
        _prepare_heatmap_dir(heat_dir, heat_names, args.overwrite)
    if maps:
        predictor.heatmap_layer(args.layer)  # no model to explain, or unknown layer: one clear error before any work
    log.info(
        "model %s%s, threshold %.3f, backend %s%s%s", predictor.name,
        f" (weights {predictor.weights_id})" if predictor.weights_id else "", predictor.threshold,
        predictor.backend,
        f", TTA {predictor.tta}" if predictor.tta != "none" else "", "" if predictor.guard is not None else ", guard off",
    )
    stream = sys.stdout
    show_bar = not args.no_progress and len(entries) >= PROGRESS_MIN_FILES and sys.stderr.isatty()
    bar = tqdm(total=len(entries), file=sys.stderr, unit="img", disable=not show_bar, leave=False)
    writer = _Writer(args.format, stream, max(len(safe_text(p, CELL_LIMIT)) for p, _ in entries), bar, heatmaps=heat_dir is not None)
    counts = {"ok": 0, "pneumonia": 0, "refused": 0, "error": 0, "seen": 0}
    t0 = time.perf_counter()
    writer.header()

    def report(pred: Prediction) -> None:
        counts[pred.status] += 1
        counts["pneumonia"] += pred.label == "PNEUMONIA"
        counts["seen"] += "seen_as" in pred.extra
        writer.row(pred)
        if pred.error is not None and args.format != "table":
            log.error("%s: %s", pred.path, pred.error)
        if args.format == "table":  # JSON and CSV carry them in the row
            for w in pred.warnings:
                log.warning("warning: %s: %s", pred.path, w)
        bar.update(1)

    heat_failures: list[str] = []
    timeout = args.decode_timeout or None  # 0: decode in-process
    saver = _heatmap_saver(heat_dir, heat_names, args.overwrite, heat_failures, style=args.heatmap_style, dicom=dicom_out,
                           decode_timeout=timeout) if maps else None
    stream_preds = predictor.predict_paths(paths, heatmap=maps, layer=args.layer, on_heatmap=saver, decode_timeout=timeout)
    for arg, why in entries:  # answers in input order, unusable arguments in their place
        if why is not None:
            report(Prediction(arg, None, None, predictor.threshold, predictor.name, error=why))
        else:
            report(next(stream_preds))
    bar.close()
    log.info("%s", run_summary(counts, time.perf_counter() - t0))
    if counts["seen"]:
        log.warning("warning: %s", seen_summary(counts["seen"], len(entries)))
    if dicom_out is not None:
        log.info("%d DICOM secondary capture(s) written to %s (one per DICOM input)", len(dicom_out.files), dicom_out.out_dir)
    if heat_failures:
        log.error("%d heat map(s) could not be written", len(heat_failures))
    return 1 if counts["error"] or heat_failures else 0


def _seconds(text: str) -> float:
    """``--decode-timeout`` values: finite seconds >= 0."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return v


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``predict`` sub-command.

    Args:
        sub: the ``pneumoscan`` parser's sub-command action.
    """
    p = sub.add_parser(
        "predict", help="predict pneumonia on chest X-rays (JPEG, PNG, DICOM)",
        description="Predict pneumonia on chest X-ray files, folders (recursive) and glob patterns. Without --checkpoint "
        "the shipped default model answers. Inputs that are not chest X-rays are refused (see --no-guard).",
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files, folders or glob patterns")
    p.add_argument("--checkpoint", help="a .pt checkpoint or run directory (default: the shipped model)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table",
                   help="table (default), json (one object per line, exact text) or csv. Table and CSV show control "
                        "characters of file names and reasons escaped (\\x0a, \\x1b); a CSV text cell starting with "
                        "= + - @ gets a leading ' so spreadsheets do not run it as a formula")
    p.add_argument("--heatmap", metavar="DIR",
                   help="save Grad-CAM overlays (PNG, original resolution) into DIR as NAME.gradcam.png (inputs with the "
                        "same name get a short hash of their path: NAME-1a2b3c4d.gradcam.png)")
    p.add_argument("--heatmap-style", choices=list(HEATMAP_STYLES), default="figure",
                   help="figure (default): the original beside the overlay, a 0-1 colour bar and a caption (probability, "
                        "label, threshold, model), each panel at most 1024 px; overlay: the overlay alone at the original resolution")
    p.add_argument("--output-dicom", metavar="DIR",
                   help="for each DICOM input, write a DICOM Secondary Capture of the heat-map figure (result burnt in, "
                        "filed in the source study: same StudyInstanceUID and patient, a new series) into DIR")
    p.add_argument("--overwrite", action="store_true",
                   help="replace heat maps already in the --heatmap folder (default: refuse before predicting)")
    p.add_argument("--layer", help="Grad-CAM target layer (default: the model's; see 'pneumoscan models --json')")
    p.add_argument("--backend", choices=["auto", "torch", "torch-bf16", "onnx"], default="auto",
                   help="auto (default: onnxruntime when installed — same probabilities as PyTorch within 1e-5, "
                        "several times faster on CPUs — else PyTorch), torch, torch-bf16 (bf16 autocast: "
                        "CPUs with AVX512-BF16/AMX) or onnx (the checkpoint is exported to the cache on first use)")
    p.add_argument("--onnx", metavar="FILE", help="an ONNX file from 'pneumoscan export' (implies --backend onnx)")
    p.add_argument("--tta", action="store_const", const="flip", help="test-time augmentation: average the image and its horizontal flip")
    p.add_argument("--tta-crops", dest="tta", action="store_const", const="crops",
                   help="test-time augmentation with crops: image, flip, 90%% centre crop and its flip")
    p.add_argument("--samples", action="store_true", help="predict the sample X-rays bundled with pneumoscan")
    p.add_argument("--no-guard", action="store_true", help="answer even for inputs that do not look like chest X-rays")
    p.add_argument("--decode-timeout", type=_seconds, default=DECODE_TIMEOUT_S, metavar="SECONDS",
                   help=f"decode each file in a worker process stopped after SECONDS (and {DECODE_MEMORY >> 20} MB of memory): "
                        f"a file that hangs or exhausts the decoder is one error row, not a stuck run (default {DECODE_TIMEOUT_S:g}; "
                        "0: decode in-process, faster, for trusted files)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8: fastest on CPUs, see docs/benchmarks.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)
