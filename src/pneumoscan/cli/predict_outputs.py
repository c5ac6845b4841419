"""Where ``pneumoscan predict``'s answers go: escaped table and CSV cells (formula
neutralising), JSON lines with their schema version, heat-map file names that never collide
or silently replace a file, and DICOM Secondary Captures."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TextIO

from ..data.dicom_reader import DICOM_IDENTIFIERS
from ..errors import ConfigError, PneumoscanError
from ..inference import Prediction
from ..utils.io import os_error_reason
from ..utils.text import safe_text
from . import STDOUT_NAME

log = logging.getLogger(__name__)

#: The longest text one table or CSV cell shows (escaped; paths up to PATH_MAX fit).
CELL_LIMIT = 4096
#: First characters that make a spreadsheet read a CSV cell as a formula.
CSV_FORMULA_CHARS = ("=", "+", "-", "@", "\t", "\r")
HEATMAP_SUFFIX = ".gradcam.png"
#: ``schema_version`` of every JSON line (raised when a key changes meaning or disappears).
JSON_SCHEMA_VERSION = "1"
#: Longest heat-map file stem, in UTF-8 bytes (file names are limited to 255).
STEM_BYTES = 120


# ----------------------------------------------------------------------------- output
def csv_cell(value: object) -> str:
    """A CSV text cell safe to print and to open in a spreadsheet: escaped by
    :func:`~pneumoscan.utils.text.safe_text`, with a ``'`` in front when it would start with
    a formula character (:data:`CSV_FORMULA_CHARS`).

    Args:
        value: the cell's text (``None`` gives an empty cell).
    """
    text = safe_text(value, CELL_LIMIT)
    return "'" + text if text.startswith(CSV_FORMULA_CHARS) else text


@contextlib.contextmanager
def _naming_stream(stream: TextIO) -> Iterator[None]:
    """An OSError while printing (a full disk behind ``> out.csv``) names the output stream,
    so the error line says what could not be written."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as e:
        if e.filename is None:
            e.filename = STDOUT_NAME if stream is sys.stdout else getattr(stream, "name", None)
        raise


class _Writer:
    """Prints predictions as a table (a ``!`` in the last column marks an answer with warnings),
    JSON lines (each with ``schema_version``) or CSV (``warnings`` joined with ``"; "``)."""

    CSV_FIELDS = ("path", "probability", "label", "threshold", "model", "weights", "guard_score", "status", "reason", "heatmap_file",
                  *DICOM_IDENTIFIERS, "dicom_output", "shift_score", "warnings")

    def __init__(self, fmt: str, stream: TextIO, path_width: int, bar: Any = None, heatmaps: bool = False) -> None:
        self.fmt = fmt
        self.heatmaps = heatmaps  # the table shows where each heat map went
        self.stream = stream
        self.width = max(8, min(path_width, 70))
        self.bar = bar
        self.csv = csv.writer(stream, lineterminator="\n") if fmt == "csv" else None

    def _emit(self, line: str) -> None:
        with _naming_stream(self.stream):
            if self.bar is not None and not self.bar.disable:
                self.bar.write(line, file=self.stream)
            else:
                print(line, file=self.stream, flush=True)

    def _csv_row(self, cells: list[str]) -> None:
        with _naming_stream(self.stream):
            self.csv.writerow(cells)  # type: ignore[union-attr]
            self.stream.flush()

    def header(self) -> None:
        if self.fmt == "table":
            self._emit(f"{'path':<{self.width}}  {'probability':>11}  label" + ("      heatmap" if self.heatmaps else "") + "      warn")
        elif self.csv is not None:
            self._csv_row(list(self.CSV_FIELDS))

    def row(self, p: Prediction) -> None:
        if self.fmt == "json":
            self._emit(json.dumps({"schema_version": JSON_SCHEMA_VERSION, **p.to_dict()}))
        elif self.csv is not None:
            prob = "" if p.probability is None else f"{p.probability:.6f}"
            score, shift = p.extra.get("guard_score", ""), p.extra.get("shift_score", "")
            self._csv_row([
                csv_cell(p.path), prob, csv_cell(p.label), f"{p.threshold:.6f}", csv_cell(p.model), csv_cell(p.extra.get("weights")),
                score if isinstance(score, (int, float)) else csv_cell(score), p.status, csv_cell(p.error or p.refused),
                csv_cell(p.extra.get("heatmap_file")), *(csv_cell(p.extra.get(k)) for k in (*DICOM_IDENTIFIERS, "dicom_output")),
                shift if isinstance(shift, (int, float)) else csv_cell(shift), csv_cell("; ".join(p.warnings)),
            ])
        else:
            path = safe_text(p.path, CELL_LIMIT)
            if len(path) > self.width:
                path = "…" + path[-(self.width - 1):]
            if p.error is not None:
                tail = f"{'-':>11}  ERROR: {safe_text(p.error, CELL_LIMIT)}"
            elif p.refused is not None:
                tail = f"{'-':>11}  REFUSED: {safe_text(p.refused, CELL_LIMIT)}"
            else:
                tail = f"{p.probability:>11.3f}  {p.label}"
                if self.heatmaps:
                    tail = f"{tail:<22}  {safe_text(p.extra.get('heatmap_file') or '-', CELL_LIMIT)}"
                if p.warnings:
                    tail = f"{tail:<22}  !"
            self._emit(f"{path:<{self.width}}  {tail}")


# ----------------------------------------------------------------------------- heat maps
def _safe_stem(path: str) -> str:
    """A file-name stem from an input's name: letters, digits and ``-_.+`` (others become
    ``_``), no leading dot, at most :data:`STEM_BYTES` bytes."""
    stem = "".join(ch if ch.isalnum() or ch in "-_.+" else "_" for ch in Path(path).stem[:STEM_BYTES]).lstrip(".")
    while len(stem.encode("utf-8")) > STEM_BYTES:
        stem = stem[:-1]
    return stem or "image"


def heatmap_names(paths: Iterable[str]) -> dict[str, str]:
    """The heat-map file name of every input file: unique per file, stable for a given set
    of inputs.

    An input is keyed by its absolute path (the same file given twice has one heat map). It
    is named after its stem (``x.gradcam.png``) unless another input has the same stem
    (compared case-insensitively, for case-insensitive file systems); those get the first 8
    hex digits of their path's sha256 (``x-1a2b3c4d.gradcam.png``, and a counter on the
    unlikely clash with another name).

    Args:
        paths: the input files, as given.

    Returns:
        Absolute path → file name.
    """
    keys = list(dict.fromkeys(os.path.abspath(p) for p in paths))
    stems = {k: _safe_stem(k) for k in keys}
    count = Counter(s.casefold() for s in stems.values())
    names = {k: s for k, s in stems.items() if count[s.casefold()] == 1}
    taken = {n.casefold() for n in names.values()}
    for k, stem in stems.items():
        if k in names:
            continue
        base = f"{stem}-{hashlib.sha256(os.fsencode(k)).hexdigest()[:8]}"
        name, i = base, 1
        while name.casefold() in taken:
            i += 1
            name = f"{base}-{i}"
        names[k] = name
        taken.add(name.casefold())
    return {k: names[k] + HEATMAP_SUFFIX for k in keys}


def _prepare_heatmap_dir(heat_dir: Path, names: Mapping[str, str], overwrite: bool) -> None:
    """Create ``heat_dir`` and check, before any work, that files can be written there and
    that no heat map would replace an existing file (unless ``overwrite``).

    Raises:
        ConfigError: not a folder, not writable, or files in the way (one line).
    """
    if heat_dir.exists() and not heat_dir.is_dir():
        raise ConfigError(f"--heatmap {heat_dir}: not a folder")
    try:
        heat_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".pneumoscan-probe-", dir=heat_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"--heatmap {heat_dir}: cannot write there ({os_error_reason(e, path=False)})") from e
    if not overwrite:
        taken = [n for n in names.values() if os.path.lexists(heat_dir / n)]
        if taken:
            raise ConfigError(
                f"--heatmap {heat_dir}: {len(taken)} heat map file(s) already there (e.g. {taken[0]}); "
                "add --overwrite to replace them, or choose another folder"
            )


def _heatmap_saver(
    out_dir: Path | None, names: Mapping[str, str], overwrite: bool, failures: list[str], *, style: str = "figure", dicom: Any = None,
    decode_timeout: float | None = None,
) -> Callable[[Prediction], None]:
    """The ``on_heatmap`` callback of :meth:`Predictor.predict_paths`: writes each heat map
    atomically under its name from :func:`heatmap_names` (``style`` ``"figure"``: original |
    overlay + colour bar + caption, panels at most 1024 px; ``"overlay"``: the overlay alone at
    the original resolution) and, with ``dicom`` (a
    :class:`~pneumoscan.workflows.dicom_output.SecondaryCaptureWriter`), the figure of each DICOM
    input as a Secondary Capture. The image is read again in a worker process stopped after
    ``decode_timeout`` seconds when that is given. A write that fails is one error line (path
    and reason) appended to ``failures``, and the prediction is still printed."""
    from ..core.imaging import resize_float
    from ..data.io import read_image_with_meta
    from ..data.isolated import decode_isolated
    from ..explain import save_overlay
    from ..explain.figure import FIGURE_MAX_SIDE, Caption, heatmap_figure, save_png
    from ..inference.reading import error_reason
    from ..utils.io import atomic_path

    written: dict[str, dict[str, str]] = {}

    def save(pred: Prediction) -> None:
        key = os.path.abspath(str(pred.path))
        if key in written:  # the same file given twice: one heat map
            pred.extra.update(written[key])
            return
        if pred.heatmap is None:
            return
        files: dict[str, str] = {}
        caption = Caption(pred.probability, pred.label, pred.threshold, pred.model, pred.extra.get("weights"))
        try:  # the overlay at the original resolution; figures from a reduced read (predict decoded it smaller still)
            read = read_image_with_meta if decode_timeout is None else partial(decode_isolated, timeout_s=decode_timeout)
            image, meta = read(str(pred.path), max_side=None if style == "overlay" else FIGURE_MAX_SIDE)
            to_dicom = dicom is not None and meta.get("format") == "DICOM"
            figure = heatmap_figure(image, pred.heatmap, caption) if style == "figure" or to_dicom else None
            if out_dir is not None:
                target = out_dir / names[key]
                with atomic_path(target, overwrite=overwrite) as tmp:
                    if figure is not None and style == "figure":
                        save_png(tmp, figure)
                    else:
                        save_overlay(tmp, image, resize_float(pred.heatmap, image.shape[0], image.shape[1]))
                files["heatmap_file"] = str(target)
            if to_dicom:
                files["dicom_output"] = str(dicom.write(str(pred.path), figure, caption.text()))
        except PneumoscanError as e:
            why = f"{pred.path}: {error_reason(e)}"
        except OSError as e:
            why = os_error_reason(e) + (" (add --overwrite to replace it)" if isinstance(e, FileExistsError) else "")
        else:
            why = ""
        pred.extra.update(files)
        written[key] = files
        if why:
            failures.append(why)
            log.error("error: heat map not written: %s", why)

    return save


def _dicom_writer(folder: str) -> Any:
    """The Secondary Capture writer of ``--output-dicom DIR`` (checked before any work)."""
    from ..workflows.dicom_output import SecondaryCaptureWriter

    d = Path(folder)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"--output-dicom {d}: not a folder")
    try:
        return SecondaryCaptureWriter(d)
    except OSError as e:
        raise ConfigError(f"--output-dicom {d}: cannot write there ({os_error_reason(e, path=False)})") from e
