"""Rendering of evaluation reports and model comparisons: Markdown and self-contained HTML
pages through the Jinja2 templates in ``evaluation/templates/``.

Nothing here computes a metric: the functions turn the results of
:func:`~pneumoscan.evaluation.evaluate.evaluate_model` and
:func:`~pneumoscan.evaluation.compare.compare_models` into the rows and sentences a page shows
(one place for both formats), and the templates lay them out. HTML output is autoescaped; the
plots are embedded as ``data:`` URIs so a page needs no other file.
"""
from __future__ import annotations

import base64
import functools
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from ..core.intervals import CI_METHODS
from ..core.metrics import METRIC_KEYS, METRIC_LABELS, format_value
from ..data.fingerprints import ROLE_WORDS
from .summaries import HIGH_SHIFT_SHARE, TABLE_METRICS, overlap_line

#: Columns of the model table of a comparison.
COMPARE_METRICS = ("roc_auc", "pr_auc", "sensitivity", "specificity", "accuracy", "precision", "f1", "brier", "ece")
_CM_HEADER = ["", "predicted NORMAL", "predicted PNEUMONIA"]
_THRESHOLD_HEADER = ["threshold", "", "sensitivity", "specificity", "PPV", "NPV", "TP / FP / TN / FN"]
_ERROR_KINDS = (("false_positives", "false positive (true NORMAL)"), ("false_negatives", "false negative (true PNEUMONIA)"))
#: Short names of the interval methods (``ci_method``) in tables.
_CI_SHORT = {"wilson": "Wilson", "wilson_jaccard": "Wilson (Jaccard → F1)", "bootstrap": "bootstrap"}
_SUMMARY_HEADER = ["split", "images", "NORMAL", "PNEUMONIA", "% pneumonia", "patients", "median size", "unreadable"]


# --------------------------------------------------------------------------- templates
@functools.lru_cache(maxsize=None)
def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("pneumoscan.evaluation", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html", "html.j2"), default_for_string=False),
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=StrictUndefined,
    )
    env.globals["md_table"] = md_table
    return env


def render_template(template: str, /, **context: Any) -> str:
    """Render one template of ``evaluation/templates`` (``*.html.j2`` autoescaped).

    Args:
        template: template file name, e.g. ``report.html.j2``.
        **context: template variables.
    """
    return _environment().get_template(template).render(**context)


def img_data_uri(path: str | Path) -> str:
    """A PNG file as a ``data:`` URI (base64) for a self-contained page.

    Args:
        path: PNG file.
    """
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def md_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pipes in cells escaped).

    Args:
        header: column titles.
        rows: cell values.
    """
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- evaluation report
def render_report_markdown(ctx: dict[str, Any]) -> str:
    """``report.md`` (plots referenced by file name, next to the report).

    Args:
        ctx: ``report`` (metrics.json content), ``plots`` (``{key: path}``), ``data_summary``,
            ``failed`` (unreadable rows), ``errors`` (the errors of the grid,
            :func:`~pneumoscan.evaluation.summaries.most_confident_errors`), ``model``
            (:func:`~pneumoscan.evaluation.evaluate.model_facts`) and ``config`` (the training
            configuration or ``None``).
    """
    return render_template("report.md.j2", **_report_view(ctx), files={k: p.name for k, p in ctx["plots"].items()})


def render_report_html(ctx: dict[str, Any]) -> str:
    """``report.html``: one page with every plot embedded as base64.

    Args:
        ctx: as for :func:`render_report_markdown`.
    """
    return render_template("report.html.j2", **_report_view(ctx), figures={k: img_data_uri(p) for k, p in ctx["plots"].items()})


def _report_view(ctx: dict[str, Any]) -> dict[str, Any]:
    r = ctx["report"]
    op, half = r["at_operating_threshold"], r["at_0.5"]
    s = ctx["data_summary"]
    errors = ctx["errors"]
    return {
        "r": r,
        "intro": _intro_lines(r),
        "warnings": _warnings(r),
        "kpis": [(k, *_value_and_ci(op[m]), op[m].get("n"), ci_label(op[m])) for k, m in (
            ("ROC-AUC", "roc_auc"), ("sensitivity", "sensitivity"), ("specificity", "specificity"), ("accuracy", "accuracy"))],
        "metric_header": ["metric", f"at operating threshold {r['threshold']:.4f}", "at 0.5", "95% CI method"],
        "metric_rows": [[METRIC_LABELS[k], format_value(op.get(k)), format_value(half.get(k)), _methods(op.get(k), half.get(k))]
                        for k in METRIC_KEYS if k != "recall"],
        "cm_header": _CM_HEADER, "cm_op": _cm_rows(op), "cm_half": _cm_rows(half),
        "threshold_header": _THRESHOLD_HEADER, "threshold_rows": [_threshold_row(t) for t in r["threshold_table"]],
        "threshold_note": _threshold_note(r["threshold_table"]),
        "calibration": _calibration_lines(r),
        "error_header": ["error", "file", "probability of PNEUMONIA"],
        "error_rows": [[kind, Path(e["path"]).name, f"{e['probability']:.3f}"] for key, kind in _ERROR_KINDS for e in errors[key]],
        "failed": [[f["path"], f["error"]] for f in ctx["failed"]],
        "seen": [[f["path"], ROLE_WORDS.get(f["role"], f["role"])] for f in (r.get("training_overlap") or {}).get("files") or []],
        "summary": None if not s else {
            "header": _SUMMARY_HEADER, "rows": _summary_rows(s), "duplicates": s["duplicates"],
            "patients_shared": list(s["patients_shared_between_splits"].items()),
        },
        "model_rows": _model_rows(r, ctx["model"]),
        "config_yaml": yaml.safe_dump(ctx["config"], sort_keys=False) if ctx["config"] else None,
    }


def _value_and_ci(entry: dict[str, Any]) -> tuple[str, str]:
    """``("0.912", "[0.880, 0.940]")`` of a metric entry (``n/a`` for a missing interval)."""
    head, _, ci = format_value({k: v for k, v in entry.items() if k != "n"}).partition(" ")
    return head, ci or "n/a"


def ci_label(entry: Mapping[str, Any] | None) -> str:
    """Short name of a metric entry's interval method (``Wilson``, ``bootstrap``, ...).

    Args:
        entry: a metric entry with ``ci_method``.
    """
    m = (entry or {}).get("ci_method")
    return _CI_SHORT.get(m, m) if m else "—"


def _methods(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    """The interval method of a metric at both thresholds (once when they agree)."""
    ma, mb = ci_label(a), ci_label(b)
    return ma if ma == mb else f"{ma} / {mb}"


def _intro_lines(r: dict[str, Any]) -> list[str]:
    op, b, sh = r["at_operating_threshold"], r["bootstrap"], r.get("shift")
    return [
        f"{op['n']} images evaluated (NORMAL {op['n_per_class']['NORMAL']}, PNEUMONIA {op['n_per_class']['PNEUMONIA']})"
        + (f"; {r['n_unreadable']} unreadable file(s) skipped" if r["n_unreadable"] else "") + ".",
        f"95% confidence intervals by metric — {b['method']} Each figure's n is its denominator.",
    ] + ([_shift_line(sh)] if sh and sh["n_scored"] else [])


def _shift_line(sh: dict[str, Any]) -> str:
    """How many images the distribution-shift check flagged, against the model's own validation rate."""
    val = f" ({100 * sh['validation_share']:.1f} % of the model's own validation images)" if sh.get("validation_share") is not None else ""
    return (f"Distribution shift: {sh['n_flagged']} of {sh['n_scored']} images ({100 * sh['share']:.1f} %) are unlike the images the "
            f"model was validated on (shift score > {sh['threshold']:.1f}){val}.")


def _warnings(r: dict[str, Any]) -> list[str]:
    """What a reader must see first, each once: images the model was built on, small or missing classes
    and collapsed bootstrap intervals (the sections' ``warnings``), unreadable files."""
    out: list[str] = []
    ov = r.get("training_overlap")
    if ov and ov["images"]:
        out.append(overlap_line(ov, r["n_images"]) + ".")
    for sec in (r["at_operating_threshold"], r["at_0.5"]):
        out += [w for w in sec.get("warnings") or [] if w not in out]
    if r["n_unreadable"]:
        out.append(f"{r['n_unreadable']} file(s) could not be read and are in no figure (listed under Unreadable files).")
    sh = r.get("shift")
    if sh and (sh["share"] or 0) > HIGH_SHIFT_SHARE:
        out.append(f"{100 * sh['share']:.0f} % of these images are unlike the images the model was validated on"
                   + (f" ({sh['population']})" if sh.get("population") else "") + ": its figures and operating threshold may not "
                   "hold here; calibrate on this site's images (pneumoscan calibrate --data) and treat its answers with caution.")
    return out


def _threshold_row(t: dict[str, Any]) -> list[str]:
    c = t["counts"]
    return [f"{t['threshold']:.4g}", "; ".join(t["labels"]), *(format_value(t[k]) for k in TABLE_METRICS),
            f"{c['tp']} / {c['fp']} / {c['tn']} / {c['fn']}"]


def _threshold_note(table: Sequence[dict[str, Any]]) -> str:
    methods = sorted({t[k]["ci_method"] for t in table for k in TABLE_METRICS})
    return ("Each cell: estimate [95% CI] (n), n being the denominator — PNEUMONIA images for sensitivity, NORMAL images "
            "for specificity, images predicted PNEUMONIA for PPV, images predicted NORMAL for NPV. Intervals: "
            + "; ".join(CI_METHODS.get(m, m) for m in methods) + ". Thresholds marked “on these data” were fitted "
            "to the images evaluated here, so their sensitivity is optimistic for new images: fix a threshold on validation "
            "data (pneumoscan calibrate) and confirm it on held-out data.")


def _cm_rows(sec: dict[str, Any]) -> list[list[str]]:
    cm, ci = sec["confusion_matrix"]["value"], sec["confusion_matrix"]["ci95"]
    f = lambda v, c: f"{v} [{c[0]}, {c[1]}]" if c[0] is not None else str(v)  # noqa: E731
    return [["true NORMAL", f(cm[0][0], ci[0][0]), f(cm[0][1], ci[0][1])], ["true PNEUMONIA", f(cm[1][0], ci[1][0]), f(cm[1][1], ci[1][1])]]


def _calibration_lines(r: dict[str, Any]) -> list[str]:
    c = r["calibration"]
    v = c.get("validation")
    if v and v.get("ece_before") is not None:
        lines = [f"Validation split stored in the checkpoint (n = {v['n']}): ECE {v['ece_before']:.4f} at T = 1 → "
                 f"{v['ece_after']:.4f} with the fitted T = {v['temperature']:.3f} (NLL {v['nll_before']:.4f} → {v['nll_after']:.4f})."]
    else:
        lines = ["The checkpoint stores no validation logits, so the validation calibration cannot be shown."]
    e = c["evaluated"]
    lines.append(f"This data set: ECE {e['ece_uncalibrated']:.4f} uncalibrated (T = 1) → {e['ece_calibrated']:.4f} calibrated.")
    return lines


def _summary_rows(s: dict[str, Any]) -> list[list[Any]]:
    return [[name, d["images"], d["per_class"]["NORMAL"], d["per_class"]["PNEUMONIA"], f"{100 * d['pneumonia_share']:.1f}%",
             d["patients"], f"{d['width']['median']:.0f}×{d['height']['median']:.0f}", d["unreadable"]] for name, d in s["splits"].items()]


def _model_rows(r: dict[str, Any], m: dict[str, Any]) -> list[list[Any]]:
    n = m["trainable_parameters"]
    rows = [
        ["weights", r["model"]], ["architecture", r.get("model_name")], ["checkpoint", r["checkpoint"]],
        ["input", f"{m['input_size']}² greyscale → {m['in_channels']}-channel backbone"],
        ["trainable parameters", f"{n:,}" if n is not None else "?"],
        ["epochs run / best epoch", f"{m['epochs_run']} / {_or(m['best_epoch'], '?')}"],
        ["operating threshold", f"{r['threshold']:.4f} ({r.get('threshold_method') or 'not fitted'})"],
        ["temperature", f"{r['temperature']:.4f}"],
    ]
    if r.get("sha256"):
        rows.append(["sha256", r["sha256"]])
    return rows


# --------------------------------------------------------------------------- model comparison
def render_compare_markdown(result: dict[str, Any], plots: dict[str, Path]) -> str:
    """``compare.md``.

    Args:
        result: :func:`~pneumoscan.evaluation.compare.compare_models` output.
        plots: ``{key: path}`` of the plots to reference (``roc``, ``pr``, ``auc``).
    """
    return render_template("compare.md.j2", **_compare_view(result), files={k: p.name for k, p in plots.items()})


def render_compare_html(result: dict[str, Any], plots: dict[str, Path]) -> str:
    """``compare.html`` (plots embedded).

    Args:
        result: :func:`~pneumoscan.evaluation.compare.compare_models` output.
        plots: ``{key: path}`` of the plots to embed.
    """
    return render_template("compare.html.j2", **_compare_view(result), figures={k: img_data_uri(p) for k, p in plots.items()})


def _compare_view(result: dict[str, Any]) -> dict[str, Any]:
    models = result["models"]
    warnings: list[str] = []
    for m in models:
        warnings += [w for w in m["at_operating_threshold"].get("warnings") or [] if w not in warnings]
    return {
        "warnings": warnings,
        "notes": _notes(result),
        "model_header": ["model", "threshold"] + [METRIC_LABELS[k] for k in COMPARE_METRICS]
        + ["trainable params", "s / epoch", "train img/s", "inference img/s"],
        "model_rows": [[m["name"], f"{m['threshold']:.3f}"] + [format_value(m["at_operating_threshold"][k]) for k in COMPARE_METRICS] + [
            _fmt(m["trainable_parameters"]), _fmt(m["training"]["seconds_per_epoch"], ".1f"),
            _fmt(m["training"]["train_images_per_s"], ".1f"), _fmt(m["inference"]["images_per_s"], ".1f")] for m in models],
        "pair_header": ["A", "B", "AUC A", "AUC B", "A − B", "DeLong 95% CI", "DeLong z", "DeLong p", "bootstrap 95% CI", "bootstrap p"],
        "pair_rows": [_pair_row(pr) for pr in result["pairs"]],
        "detail_header": ["model", "checkpoint", "weights", "threshold", "temperature", "epochs", "best epoch"],
        "detail_rows": [[m["name"], m["checkpoint"], m["weights"], f"{m['threshold']:.4f} ({m['threshold_method'] or 'not fitted'})",
                         f"{m['temperature']:.3f}", m["training"]["epochs_run"], m["training"]["best_epoch"]] for m in models],
    }


def _pair_row(pr: dict[str, Any]) -> list[str]:
    d, b = pr["delong"], pr["bootstrap"]
    ci_b = b["ci95"]
    return [pr["a"], pr["b"], f"{d['auc_a']:.4f}", f"{d['auc_b']:.4f}", f"{d['diff']:+.4f}",
            f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]", f"{d['z']:.2f}", _p(d["p_value"]),
            f"[{ci_b[0]:+.4f}, {ci_b[1]:+.4f}]" if ci_b[0] is not None else "—", _p(b["p_value"])]


def _notes(result: dict[str, Any]) -> list[str]:
    b, inf = result["bootstrap"], result["models"][0]["inference"]
    n = [f"{result['n']} images (NORMAL {result['n_per_class']['NORMAL']}, PNEUMONIA {result['n_per_class']['PNEUMONIA']}) from "
         f"{result['data']}" + (f" (split {result['split']})" if result["split"] else "") + ", scored by every model.",
         f"Metrics at each model's own operating threshold (stored in its checkpoint); 95% confidence intervals by metric — "
         f"{b['method'][:-1]} (the same resamples for every model). Each figure's n is its denominator.",
         "Training time per epoch and training throughput are means over the run's history (on the machine that trained it); "
         "inference images/s were measured during this comparison (decode + preprocessing + forward pass, "
         f"device {inf['device']}, batch {inf['batch_size']}, {inf['threads']} CPU threads)."]
    if result["pairs"]:
        n.append("AUC differences: DeLong's test for correlated ROC curves (two-sided, normal approximation) and, as a check, "
                 "a paired stratified bootstrap of the difference on the same resamples.")
    elif len(result["models"]) > 1:
        n.append("No paired AUC test: the data hold a single class.")
    if result["n_left_out"]:
        n.append(f"{result['n_left_out']} unreadable image(s) left out.")
    return n


def _fmt(v: Any, spec: str = ",.0f", none: str = "—") -> str:
    return none if v is None else format(v, spec)


def _or(v: Any, default: str) -> Any:
    return default if v is None else v


def _p(p: float | None) -> str:
    if p is None:
        return "—"
    return f"{p:.2g}" if p >= 1e-4 else "< 0.0001"
