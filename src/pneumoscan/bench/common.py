"""Shared pieces of the benchmark harness: machine description, timing, peak memory, result
tables and the interleaved (ABAB...) measurement that keeps ratios honest on a shared machine.

Every benchmark compares each variant with a baseline *measured in the same run*: rounds of
baseline and variants alternate, so a neighbour's load slows all of them alike and the ratio
of medians stays meaningful even when absolute numbers move.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..utils.io import atomic_write_text
from ..utils.runtime import malloc_setting

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_average() -> float | None:
    """1-minute load average (``None`` where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, threads, library versions, bf16/AMX/VNNI support, GPU and load.

    The load average is part of the record: on a shared machine it says how contended the
    run was.
    """
    import torch

    from ..training.runtime import cpu_supports_bf16

    flags = _cpu_flags()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bf16_autocast": cpu_supports_bf16(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_tile" in flags,
        "avx512_vnni": "avx512_vnni" in flags or "avx_vnni" in flags,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_1min": load_average(),
        "malloc": malloc_setting(),
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def format_machine(info: dict[str, Any]) -> str:
    """One line describing the machine, for the top of every report."""
    isa = [k for k in ("avx512_bf16", "amx", "avx512_vnni") if info.get(k)]
    gpu = f", GPU {info['cuda']}" if info.get("cuda") else ", no GPU"
    ort = f", onnxruntime {info['onnxruntime']}" if info.get("onnxruntime") else ""
    return (
        f"machine: {info['cpu']} ({info['cores']} cores, {info['torch_threads']} torch threads){gpu}; "
        f"torch {info['torch']}{ort}; bf16 autocast {'yes' if info['bf16_autocast'] else 'no'} "
        f"({', '.join(isa) or 'no bf16/int8 ISA extensions'}); malloc {info.get('malloc', 'system')}; "
        f"load average {info['load_avg_1min']}"
    )


# --------------------------------------------------------------------------- memory
def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux ``/proc/self/clear_refs``); False if the
    OS does not allow it (peaks are then process-wide)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (since the last :func:`reset_peak_rss`)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def children_peak_rss_mb() -> float:
    """Largest peak RSS of any waited-for child process, in MiB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- statistics
def percentiles(values_ms: Sequence[float], qs: Sequence[int] = (50, 90, 95, 99)) -> dict[str, float]:
    """``{"p50": ..., "p90": ...}`` of latencies in milliseconds."""
    if not len(values_ms):
        return {f"p{q}": float("nan") for q in qs}
    arr = np.asarray(values_ms, dtype=np.float64)
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


@dataclass
class VariantResult:
    """One measured variant.

    Attributes:
        name: what was measured (e.g. ``"bf16 + channels_last"``).
        baseline: whether this is the reference the others are compared with.
        images_per_s: median throughput over the rounds.
        rounds: throughput of each round (the spread shows the noise).
        ratio: ``images_per_s / baseline images_per_s`` (from the same run).
        latency_ms: latency percentiles where latency was measured.
        peak_rss_mb: peak resident memory while this variant ran.
        extra: variant-specific numbers (data vs compute time per step, AUC, ...).
    """

    name: str
    baseline: bool = False
    images_per_s: float = float("nan")
    rounds: list[float] = field(default_factory=list)
    ratio: float = float("nan")
    latency_ms: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchReport:
    """A benchmark's full result: what ran, where, and each variant's numbers."""

    benchmark: str
    title: str
    machine: dict[str, Any]
    settings: dict[str, Any]
    variants: list[VariantResult]
    notes: list[str] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)

    def finish(self) -> "BenchReport":
        """Fill in the ratios against the baseline and the final load average."""
        base = next((v for v in self.variants if v.baseline), None)
        for v in self.variants:
            if base is not None and base.images_per_s > 0:
                v.ratio = v.images_per_s / base.images_per_s
        self.machine["load_avg_1min_end"] = load_average()
        return self

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    def write_json(self, path: str | Path) -> None:
        """Write the report as JSON (atomically)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def format(self) -> str:
        """The report as text: title, machine line, settings, the variant table, targets."""
        lines = [f"pneumoscan benchmark {self.benchmark}: {self.title}", format_machine(self.machine)]
        lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        cols = _table_columns(self.variants)
        header = f"{'variant':<48}" + "".join(f"{c[0]:>{c[1]}}" for c in cols)
        lines += [header, "-" * len(header)]
        for v in self.variants:
            name = v.name + (" [baseline]" if v.baseline else "")
            lines.append(f"{name:<48}" + "".join(f"{c[2](v):>{c[1]}}" for c in cols))
        for t in self.targets:
            lines.append(
                f"target: {t['what']}: {t['measured']} (goal {t['goal']}) -> {'MET' if t['met'] else 'NOT MET'}"
                + (f"; per round {t['rounds']}" if t.get("rounds") else "")
            )
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"load average at end: {self.machine.get('load_avg_1min_end')}")
        return "\n".join(lines)


def _fmt(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return format(x, spec)


def _table_columns(variants: Sequence[VariantResult]) -> list[tuple[str, int, Callable[[VariantResult], str]]]:
    cols: list[tuple[str, int, Callable[[VariantResult], str]]] = [
        ("img/s", 9, lambda v: _fmt(v.images_per_s, ".1f")),
        ("vs baseline", 13, lambda v: _fmt(v.ratio, ".2f") + "x" if np.isfinite(v.ratio) else "-"),
    ]
    if any("data_ms_per_step" in v.extra for v in variants):
        cols.append(("data ms/step", 14, lambda v: _fmt(v.extra.get("data_ms_per_step"), ".1f")))
        cols.append(("compute ms/step", 17, lambda v: _fmt(v.extra.get("compute_ms_per_step"), ".1f")))
    if any(v.latency_ms for v in variants):
        for q in ("p50", "p95", "p99"):
            cols.append((f"{q} ms", 9, lambda v, q=q: _fmt(v.latency_ms.get(q), ".1f")))
    if any("auc" in v.extra for v in variants):
        cols.append(("val AUC", 9, lambda v: _fmt(v.extra.get("auc"), ".4f")))
    cols.append(("peak RSS MB", 13, lambda v: _fmt(v.peak_rss_mb, ".0f")))
    return cols


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


# --------------------------------------------------------------------------- interleaving
def interleaved(
    runners: dict[str, Callable[[], tuple[int, float]]],
    rounds: int,
    on_round: Callable[[str, int, float], None] | None = None,
) -> dict[str, list[float]]:
    """Run every variant once per round, in rotating order, and collect images/s per round.

    Args:
        runners: name → callable doing one timed chunk of work and returning
            ``(images, seconds)``.
        rounds: number of rounds (each variant runs once per round).
        on_round: called with ``(name, round, images_per_s)`` after each chunk.

    Returns:
        name → list of images/s, one per round.
    """
    names = list(runners)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: nobody always goes first
        for n in order:
            images, seconds = runners[n]()
            ips = images / max(seconds, 1e-9)
            out[n].append(ips)
            if on_round is not None:
                on_round(n, r, ips)
    return out


def median(values: Sequence[float]) -> float:
    """Median (NaN for an empty list)."""
    return float(statistics.median(values)) if values else float("nan")


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    def __enter__(self) -> "Stopwatch":
        self.t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
