"""``pneumoscan compare``: models side by side on the same labelled images — metrics with
bootstrap confidence intervals, trainable parameters, training time per epoch, inference
throughput, overlaid ROC and precision-recall curves, and a paired test of each pair's AUC
difference (DeLong's test, with a paired bootstrap beside it).

Writes ``compare.json``, ``compare.md``, ``compare.html``, ``roc_overlay.png``,
``pr_overlay.png`` and ``auc.png`` into the output folder (each atomically).
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data.datasets import CLASS_NAMES
from ..errors import DataError
from ..utils.io import atomic_write_text
from ..core.metrics import DEFAULT_RESAMPLES, METRIC_LABELS, bootstrap_metrics, delong_test, format_value, paired_bootstrap_auc
from .report import _jsonable, html_page, run_history, html_table, img_data_uri, load_model, md_table, predict_samples, resolve_samples

log = logging.getLogger(__name__)

TABLE_METRICS = ("roc_auc", "pr_auc", "sensitivity", "specificity", "accuracy", "precision", "f1", "brier", "ece")


def _training_stats(ckpt: dict[str, Any]) -> dict[str, Any]:
    hist = run_history(ckpt)
    et = [float(r["epoch_time"]) for r in hist if r.get("epoch_time") is not None]
    ips = [float(r["train_images_per_s"]) for r in hist if r.get("train_images_per_s") is not None]
    return {
        "epochs_run": len(hist),
        "best_epoch": ckpt.get("best_epoch"),
        "seconds_per_epoch": float(np.mean(et)) if et else None,
        "train_images_per_s": float(np.mean(ips)) if ips else None,
        "world_size": int(hist[-1].get("world_size", 1)) if hist else None,
        "device": (ckpt.get("config") or {}).get("device"),
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
) -> dict[str, Any]:
    """Compare checkpoints (files or run directories) on one labelled data set.

    Args:
        sources: checkpoints or run directories (at least one).
        data: folder data set, class-folder directory or CSV manifest.
        out: output folder.
        split: split of a folder data set (default ``test``) or of a manifest's ``split`` column.
        n_resamples: bootstrap resamples (confidence intervals and the paired AUC bootstrap).
        seed: bootstrap seed (the same resamples serve every model).
        device: torch device of the predictors.
        batch_size: images per forward pass.

    Returns:
        The content of ``compare.json``.
    """
    from ..utils.version import __version__
    from .plots import plot_metric_bars, plot_precision_recall, plot_roc

    if not sources:
        raise DataError("compare needs at least one checkpoint or run directory")
    out = Path(out)
    samples, used_split = resolve_samples(data, split)
    loaded = [load_model(s, device=device, batch_size=batch_size) for s in sources]
    import torch

    names = _unique_names([str(c.get("model_name") if sum(1 for _, d in loaded if d.get("model_name") == c.get("model_name")) == 1
                               else p.name) for p, c in loaded])
    probs: list[list[float | None]] = []
    infer: list[dict[str, Any]] = []
    for (pred, _ckpt), name in zip(loaded, names, strict=True):
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
    for k, ((pred, ckpt), name) in enumerate(zip(loaded, names)):
        secs = bootstrap_metrics(y, P[k], {"at_operating_threshold": pred.threshold, "at_0.5": 0.5}, n_resamples=n_resamples, seed=seed)
        models.append({
            "name": name, "weights": pred.name, "model_name": ckpt.get("model_name"), "checkpoint": str(ckpt.get("_path", "default model")),
            "trainable_parameters": ckpt.get("trainable_parameters"), "threshold": pred.threshold,
            "threshold_method": ckpt.get("threshold_method"), "temperature": pred.temperature,
            "training": _training_stats(ckpt), "inference": infer[k],
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
        "bootstrap": {"resamples": n_resamples, "seed": seed, "ci": 0.95, "method": "stratified percentile bootstrap"},
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
    atomic_write_text(out / "compare.json", json.dumps(_jsonable(result), indent=2) + "\n")
    atomic_write_text(out / "compare.md", render_compare_markdown(result, plots))
    atomic_write_text(out / "compare.html", render_compare_html(result, plots))
    log.info("comparison of %d model(s) on %d images written to %s", len(models), y.size, out)
    return result


# --------------------------------------------------------------------------- rendering
def _fmt(v: Any, spec: str = ",.0f", none: str = "—") -> str:
    return none if v is None else format(v, spec)


def _p(p: float | None) -> str:
    if p is None:
        return "—"
    return f"{p:.2g}" if p >= 1e-4 else "< 0.0001"


def _model_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "threshold"] + [METRIC_LABELS[k] for k in TABLE_METRICS] + [
        "trainable params", "s / epoch", "train img/s", "inference img/s"]
    rows = []
    for m in result["models"]:
        op = m["at_operating_threshold"]
        rows.append([m["name"], f"{m['threshold']:.3f}"] + [format_value(op[k]) for k in TABLE_METRICS] + [
            _fmt(m["trainable_parameters"]), _fmt(m["training"]["seconds_per_epoch"], ".1f"),
            _fmt(m["training"]["train_images_per_s"], ".1f"), _fmt(m["inference"]["images_per_s"], ".1f")])
    return header, rows


def _pair_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["A", "B", "AUC A", "AUC B", "A − B", "DeLong 95% CI", "DeLong z", "DeLong p", "bootstrap 95% CI", "bootstrap p"]
    rows = []
    for pr in result["pairs"]:
        d, b = pr["delong"], pr["bootstrap"]
        ci_b = b["ci95"]
        rows.append([pr["a"], pr["b"], f"{d['auc_a']:.4f}", f"{d['auc_b']:.4f}", f"{d['diff']:+.4f}",
                     f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]", f"{d['z']:.2f}", _p(d["p_value"]),
                     f"[{ci_b[0]:+.4f}, {ci_b[1]:+.4f}]" if ci_b[0] is not None else "—", _p(b["p_value"])])
    return header, rows


def _notes(result: dict[str, Any]) -> list[str]:
    b = result["bootstrap"]
    n = [f"{result['n']} images (NORMAL {result['n_per_class']['NORMAL']}, PNEUMONIA {result['n_per_class']['PNEUMONIA']}) from "
         f"{result['data']}" + (f" (split {result['split']})" if result["split"] else "") + ", scored by every model.",
         f"Metrics at each model's own operating threshold (stored in its checkpoint); 95% CIs from a {b['method']} "
         f"({b['resamples']:,} resamples, seed {b['seed']}, the same resamples for every model).",
         "Training time per epoch and training throughput are means over the run's history (on the machine that trained it); "
         "inference images/s were measured during this comparison (decode + preprocessing + forward pass, "
         f"device {result['models'][0]['inference']['device']}, batch {result['models'][0]['inference']['batch_size']}, "
         f"{result['models'][0]['inference']['threads']} CPU threads)."]
    if result["pairs"]:
        n.append("AUC differences: DeLong's test for correlated ROC curves (two-sided, normal approximation) and, as a check, "
                 "a paired stratified bootstrap of the difference on the same resamples.")
    elif len(result["models"]) > 1:
        n.append("No paired AUC test: the data hold a single class.")
    if result["n_left_out"]:
        n.append(f"{result['n_left_out']} unreadable image(s) left out.")
    return n


def render_compare_markdown(result: dict[str, Any], plots: dict[str, Path]) -> str:
    """``compare.md``.

    Args:
        result: :func:`compare_models` output.
        plots: ``{key: path}`` of the plots to reference.
    """
    L = ["# Model comparison", ""] + [f"- {x}" for x in _notes(result)] + [""]
    h, r = _model_table(result)
    L += ["## Models", "", md_table(h, r), ""]
    if result["pairs"]:
        h, r = _pair_table(result)
        L += ["## Paired AUC differences", "", md_table(h, r), ""]
    for key, title in (("roc", "ROC curves"), ("pr", "Precision-recall curves"), ("auc", "ROC-AUC with 95% CI")):
        if key in plots:
            L += [f"![{title}]({plots[key].name})", ""]
    L += ["## Models (details)", ""]
    for m in result["models"]:
        L.append(f"- **{m['name']}**: `{m['checkpoint']}` ({m['weights']}); threshold {m['threshold']:.4f} "
                 f"({m['threshold_method'] or 'not fitted'}), temperature {m['temperature']:.3f}; "
                 f"{m['training']['epochs_run']} epoch(s), best epoch {m['training']['best_epoch']}.")
    return "\n".join(L) + "\n"


def render_compare_html(result: dict[str, Any], plots: dict[str, Path]) -> str:
    """``compare.html`` (plots embedded).

    Args:
        result: :func:`compare_models` output.
        plots: ``{key: path}`` of the plots to embed.
    """
    esc = html.escape
    B = ["<h1>Model comparison</h1>"] + [f"<p class='note'>{esc(x)}</p>" for x in _notes(result)]
    h, r = _model_table(result)
    B += ["<h2>Models</h2>", html_table(h, r)]
    if result["pairs"]:
        h, r = _pair_table(result)
        B += ["<h2>Paired AUC differences</h2>", html_table(h, r)]
    figs = [f"<figure><img alt='{esc(t)}' src='{img_data_uri(plots[k])}'><figcaption>{esc(t)}</figcaption></figure>"
            for k, t in (("roc", "ROC curves"), ("pr", "Precision-recall curves"), ("auc", "ROC-AUC with 95% CI")) if k in plots]
    if figs:
        B += ["<h2>Curves</h2><div class='grid'>"] + figs + ["</div>"]
    B += ["<h2>Models (details)</h2>", html_table(["model", "checkpoint", "weights", "threshold", "temperature", "epochs", "best epoch"], [
        [m["name"], m["checkpoint"], m["weights"], f"{m['threshold']:.4f} ({m['threshold_method'] or 'not fitted'})",
         f"{m['temperature']:.3f}", m["training"]["epochs_run"], m["training"]["best_epoch"]] for m in result["models"]])]
    return html_page("pneumoscan model comparison", "\n".join(B))
