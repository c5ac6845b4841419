"""``pneumoscan compare``: models side by side on the same labelled images — metrics with
confidence intervals (Wilson for proportions, stratified bootstrap for the AUCs, Brier and ECE), trainable parameters, training time per epoch, inference
throughput, overlaid ROC and precision-recall curves, and a paired test of each pair's AUC
difference (DeLong's test, with a paired bootstrap beside it).

Writes ``compare.json``, ``compare.md``, ``compare.html``, ``roc_overlay.png``,
``pr_overlay.png`` and ``auc.png`` into the output folder (each atomically).
"""
from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..core.labels import CLASS_NAMES
from ..core.metrics import DEFAULT_RESAMPLES, bootstrap_metrics, delong_test, paired_bootstrap_auc
from ..errors import DataError
from ..utils.io import atomic_write_text
from .evaluate import best_epoch, predict_samples, resolve_samples, run_history, write_json
from .render import render_compare_html, render_compare_markdown
from .summaries import interval_summary

if TYPE_CHECKING:
    from ..models.bundle import ModelBundle

log = logging.getLogger(__name__)


def _training_stats(bundle: ModelBundle) -> dict[str, Any]:
    hist = run_history(bundle)
    et = [float(r["epoch_time"]) for r in hist if r.get("epoch_time") is not None]
    ips = [float(r["train_images_per_s"]) for r in hist if r.get("train_images_per_s") is not None]
    return {
        "epochs_run": len(hist),
        "best_epoch": best_epoch(bundle),
        "seconds_per_epoch": float(np.mean(et)) if et else None,
        "train_images_per_s": float(np.mean(ips)) if ips else None,
        "world_size": int(hist[-1].get("world_size", 1)) if hist else None,
        "device": (bundle.provenance.get("config") or {}).get("device"),
    }


def _unique_names(names: list[str]) -> list[str]:
    out, seen = [], {}
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n}#{k + 1}")
    return out


def compare_models(
    sources: Sequence[str | Path],
    data: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 16,
    columns: str | dict[str, str] | None = None,
) -> dict[str, Any]:
    """Compare model bundles (files or run directories) on one labelled data set.

    Args:
        sources: bundle files or run directories (at least one).
        data: folder data set, class-folder directory or CSV manifest.
        out: output folder.
        split: split of a folder data set (default ``test``) or of a manifest's ``split`` column.
        n_resamples: bootstrap resamples (confidence intervals and the paired AUC bootstrap).
        seed: bootstrap seed (the same resamples serve every model).
        device: torch device of the predictors.
        batch_size: images per forward pass.
        columns: a manifest's own column names (see :func:`pneumoscan.data.datasets.read_manifest`).

    Returns:
        The content of ``compare.json``.
    """
    import torch

    from ..inference import load_predictor
    from ..utils.version import __version__
    from .plots import plot_metric_bars, plot_precision_recall, plot_roc

    if not sources:
        raise DataError("compare needs at least one checkpoint or run directory")
    out = Path(out)
    samples, used_split = resolve_samples(data, split, columns)
    predictors = [load_predictor(s, backend="torch", device=device, batch_size=batch_size, guard=False) for s in sources]
    bundles = [pred.bundle for pred in predictors]
    archs = [b.arch for b in bundles]
    names = _unique_names([b.arch if archs.count(b.arch) == 1 else b.name for b in bundles])
    probs: list[list[float | None]] = []
    infer: list[dict[str, Any]] = []
    for pred, name in zip(predictors, names, strict=True):
        # warm-up forward pass so one-off initialisation is not billed to throughput
        pred.probabilities([np.zeros((pred.input_size, pred.input_size), np.float32)])
        rows, elapsed = predict_samples(pred, samples)
        probs.append([r["probability"] for r in rows])
        infer.append({"seconds": elapsed, "images_per_s": len(rows) / max(elapsed, 1e-9), "images": len(rows),
                      "device": device, "batch_size": batch_size, "threads": torch.get_num_threads(),
                      "includes": "decode + preprocessing + forward pass"})
        log.info("%s: %d images in %.1f s (%.1f images/s)", name, len(rows), elapsed, len(rows) / max(elapsed, 1e-9))
    keep = [i for i in range(len(samples)) if all(pk[i] is not None for pk in probs)]
    if not keep:
        raise DataError("no image could be read by every model")
    if len(keep) < len(samples):
        log.warning("%d unreadable image(s) left out of the comparison", len(samples) - len(keep))
    y = np.array([samples[i].label for i in keep], dtype=np.int64)
    P = np.array([[pk[i] for i in keep] for pk in probs], dtype=np.float64)
    both = y.min() != y.max()

    models = []
    for k, (b, name) in enumerate(zip(bundles, names, strict=True)):
        secs = bootstrap_metrics(y, P[k], {"at_operating_threshold": b.threshold, "at_0.5": 0.5}, n_resamples=n_resamples, seed=seed)
        models.append({
            "name": name, "weights": b.name, "model_name": b.arch, "checkpoint": str(b.path) if b.path is not None else "default model",
            "trainable_parameters": b.provenance.get("trainable_parameters"), "threshold": b.threshold,
            "threshold_method": b.threshold_method, "temperature": b.temperature,
            "training": _training_stats(b), "inference": infer[k],
            "at_operating_threshold": secs["at_operating_threshold"], "at_0.5": secs["at_0.5"],
        })
    pairs = []
    if both:
        for i in range(len(models)):
            for j in range(i + 1, len(models)):
                pairs.append({
                    "a": names[i], "b": names[j],
                    "delong": delong_test(y, P[i], P[j]),
                    "bootstrap": paired_bootstrap_auc(y, P[i], P[j], n_resamples=n_resamples, seed=seed),
                })
    result: dict[str, Any] = {
        "data": str(data), "split": used_split, "n": int(y.size),
        "n_per_class": {CLASS_NAMES[c]: int((y == c).sum()) for c in (0, 1)},
        "n_left_out": len(samples) - len(keep),
        "models": models, "pairs": pairs,
        "bootstrap": interval_summary(models[0]["at_operating_threshold"], n_resamples, seed),
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "pneumoscan_version": __version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    if both:
        plot_roc([(n, y, P[k]) for k, n in enumerate(names)], out / "roc_overlay.png", title="ROC curves")
        plot_precision_recall([(n, y, P[k]) for k, n in enumerate(names)], out / "pr_overlay.png", title="precision-recall curves")
        plots["roc"], plots["pr"] = out / "roc_overlay.png", out / "pr_overlay.png"
        plot_metric_bars([(m["name"], m["at_operating_threshold"]["roc_auc"]["value"], *m["at_operating_threshold"]["roc_auc"]["ci95"])
                          for m in models], out / "auc.png", "ROC-AUC with 95% CI")
        plots["auc"] = out / "auc.png"
    write_json(result, out / "compare.json")
    atomic_write_text(out / "compare.md", render_compare_markdown(result, plots))
    atomic_write_text(out / "compare.html", render_compare_html(result, plots))
    log.info("comparison of %d model(s) on %d images written to %s", len(models), y.size, out)
    return result
