"""``MODEL_CARD.md``: what a trained pneumoscan model is for, what it was trained on, how well
it did on validation (with confidence intervals) and where it is known to fail.

Every training run writes one into its run directory; ``pneumoscan calibrate`` rewrites it
when it changes the operating point of a run's ``best.pt``. The facts about the model come from
the :class:`~pneumoscan.models.bundle.ModelBundle` and the run's split files; the facts about
the data (name, source, licence, citation, population) from a data card or the data folder's
README (:func:`~pneumoscan.evaluation.data_card.load_data_card`), never from assumptions. The
card opens with Hugging Face-style YAML front matter and holds no absolute path; the text is
the template ``evaluation/templates/model_card.md.j2``.
"""
from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import yaml

from ..core.calibration import calibration_summary, sigmoid
from ..core.labels import CLASS_NAMES
from ..core.metrics import DEFAULT_ECE_BINS, METRIC_KEYS, METRIC_LABELS, bootstrap_metrics, format_value
from ..data.datasets import class_counts, read_manifest
from ..errors import PneumoscanError
from ..utils.io import atomic_write_text
from .data_card import hf_license, load_data_card, resolve_data_card, strip_paths
from .evaluate import best_epoch, run_history
from .render import ci_label, render_template
from .summaries import interval_summary

if TYPE_CHECKING:
    from ..models.bundle import ModelBundle

__all__ = ["MODEL_CARD", "data_splits", "load_data_card", "render_model_card", "validation_report", "write_model_card"]

log = logging.getLogger(__name__)

MODEL_CARD = "MODEL_CARD.md"
#: What the card says where the data's files do not state a fact.
UNKNOWN = "unknown — supply --data-card"
#: ``tags`` of the card's front matter.
CARD_TAGS = ("chest-x-ray", "pneumonia", "image-classification")

_RULES = {
    "youden": "maximum Youden index (sensitivity + specificity − 1)",
    "sensitivity": "highest threshold reaching sensitivity ≥ {target:.2f}",
    "f1": "maximum F1",
}


def validation_report(bundle: ModelBundle, n_resamples: int = 2000, seed: int = 0) -> dict[str, Any] | None:
    """Validation metrics of a model from its stored validation logits, at its operating
    threshold and at 0.5 (Wilson / bootstrap intervals), plus the calibration before/after
    temperature scaling.

    Args:
        bundle: the model (``provenance["val_logits"]``/``["val_labels"]``, ``temperature``,
            ``threshold``).
        n_resamples: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        ``{"metrics": {...}, "calibration": {...}, "bootstrap": {...}}`` (``bootstrap``: see
        :func:`~pneumoscan.evaluation.summaries.interval_summary`), or ``None`` when the bundle
        holds no validation logits.
    """
    z = np.asarray(bundle.provenance.get("val_logits") or [], dtype=np.float64)
    y = np.asarray(bundle.provenance.get("val_labels") or [], dtype=np.int64)
    if z.size == 0 or z.size != y.size:
        return None
    t, thr = bundle.temperature, bundle.threshold
    metrics = bootstrap_metrics(y, sigmoid(z / t), {"at_operating_threshold": thr, "at_0.5": 0.5}, n_resamples=n_resamples, seed=seed)
    return {"metrics": metrics, "calibration": calibration_summary(z, y, t),
            "bootstrap": interval_summary(metrics["at_operating_threshold"], n_resamples, seed)}


def data_splits(bundle: ModelBundle, run_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Images per class and patients of the training and validation splits: from the run's
    split files when they are there, else the counts in the bundle's provenance (patients then
    unknown).

    Args:
        bundle: the model (``provenance["data"]``, ``provenance["split_files"]``).
        run_dir: its run directory, if any.

    Returns:
        One dict per split: ``split``, ``images``, ``NORMAL``, ``PNEUMONIA``, ``patients``
        (``None`` where unknown) and ``file`` (the split file's name or ``None``).
    """
    files = bundle.provenance.get("split_files") or {"train": "split_train.csv", "val": "split_val.csv"}
    prov = bundle.provenance.get("data") or {}
    out = []
    val_title = "monitor (logged only)" if bundle.provenance.get("cv") else "validation"  # a --refit model: see its CV table
    for split, title in (("train", "training"), ("val", val_title)):
        f = Path(run_dir) / files[split] if run_dir is not None and split in files else None
        try:
            samples = read_manifest(f) if f is not None and f.is_file() else None
        except PneumoscanError as e:
            log.warning("model card: %s unreadable (%s); using the counts stored in the checkpoint", f.name if f else split, e)
            samples = None
        if samples is not None:
            out.append({"split": title, "images": len(samples), **dict(zip(CLASS_NAMES, class_counts(samples))),
                        "patients": len({s.patient for s in samples}), "file": f.name if f else None})
        elif prov.get(f"{split}_counts"):
            counts = prov[f"{split}_counts"]
            out.append({"split": title, "images": prov.get(f"n_{split}", sum(counts.values())), **{c: counts.get(c) for c in CLASS_NAMES},
                        "patients": None, "file": None})
    return out


def render_model_card(
    bundle: ModelBundle, run_dir: str | Path | None = None, n_resamples: int = 2000, seed: int = 0,
    data_card: Mapping[str, Any] | str | Path | None = None,
) -> str:
    """The model card of a bundle as Markdown (YAML front matter first).

    Args:
        bundle: the model.
        run_dir: its run directory (for the split files), if any.
        n_resamples: bootstrap resamples of the validation confidence intervals.
        seed: bootstrap seed.
        data_card: facts about the training data (a mapping with ``name``, ``source``,
            ``license``, ``citation``, ``population``) or a data card file (YAML, or Markdown
            with front matter); ``None``: read the training data folder's data card or README
            (:func:`~pneumoscan.evaluation.data_card.load_data_card`). Facts nobody states are
            shown as unknown.
    """
    from ..utils.version import __version__

    cfg = bundle.provenance.get("config") or {}
    mcfg, dcfg, ocfg = cfg.get("model") or {}, cfg.get("data") or {}, cfg.get("optim") or {}
    hist = run_history(bundle)
    epoch_times = [float(r["epoch_time"]) for r in hist if r.get("epoch_time") is not None]
    val = validation_report(bundle, n_resamples, seed)
    target = (bundle.provenance.get("calibration") or {}).get("target_sensitivity") or cfg.get("target_sensitivity") or 0.95
    root = str((bundle.provenance.get("data") or {}).get("root") or dcfg.get("root") or "")
    best = best_epoch(bundle)
    training = (f"{len(hist)} epoch(s) run, best epoch {'?' if best is None else best} (lowest validation loss"
                + (f", from epoch {cfg.get('min_epoch_for_best')} on" if cfg.get("min_epoch_for_best", 1) > 1 else "") + "); "
                f"optimiser {ocfg.get('optimizer', '?')}, lr {ocfg.get('lr', '?')}, batch {cfg.get('batch_size', '?')}, "
                f"class balance {cfg.get('class_balance', '?')}"
                + (f"; {np.mean(epoch_times):.1f} s per epoch on average" if epoch_times else ""))
    val_source = str(dcfg.get("val_source", "?"))
    if bundle.provenance.get("cv"):  # trained on every image (train --folds K --refit)
        val_source = (f"the pooled out-of-fold predictions of the cross-validation (the run itself trained on every image; "
                      f"`{val_source}` was only monitored)")
    data_used = ((f"folder `{Path(root).name}`, training split `{dcfg.get('train_split', 'train')}`" if root else "unknown")
                 + f"; validation: {portable_paths(val_source, run_dir)}"
                 + (f" ({100 * float(dcfg.get('val_fraction', 0)):.0f}% of training patients held out, grouped by patient)"
                    if val_source == "grouped" else ""))
    data = resolve_data_card(data_card, root or None)
    card_from = f"`{data['file']}`" if data["file"] else ("the facts supplied with the card" if isinstance(data_card, Mapping) else None)
    dataset = data["name"] or (Path(root).name if root else None)
    front: dict[str, Any] = {"license": hf_license(data["license"])}
    if front["license"] == "other":
        front["license_name"] = data["license"]
    front |= {"tags": list(CARD_TAGS), "datasets": [dataset] if dataset else [], "metrics": [k for k in METRIC_KEYS if k != "recall"]}
    n = bundle.provenance.get("trainable_parameters")
    return render_template(
        "model_card.md.j2",
        front_matter=yaml.safe_dump(front, sort_keys=False, allow_unicode=True, default_flow_style=None, width=10_000).rstrip(),
        name=bundle.name, version=__version__, generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        arch=bundle.arch, input_size=bundle.preprocessing.input_size, in_channels=bundle.preprocessing.in_channels,
        init=(mcfg.get("weights") or "random") + (" (backbone frozen)" if mcfg.get("freeze_backbone") else ""),
        trainable_parameters=None if n is None else int(n), training=training, sha256=bundle.sha256,
        data=data, card_from=card_from, unknown=UNKNOWN, data_used=data_used, splits=data_splits(bundle, run_dir),
        run_dir=run_dir, threshold=bundle.threshold, threshold_method=bundle.threshold_method, temperature=bundle.temperature,
        rule=_RULES.get(bundle.threshold_method or "", bundle.threshold_method or "").format(target=float(target)),
        val=None if val is None else {**val, "sections": [
            _section(val["metrics"]["at_operating_threshold"], f"At the operating threshold ({bundle.threshold:.4f})"),
            _section(val["metrics"]["at_0.5"], "At threshold 0.5"),
        ]},
        ece_bins=DEFAULT_ECE_BINS, config_yaml=yaml.safe_dump(portable_paths(cfg, run_dir), sort_keys=False, allow_unicode=True),
        site=_site(bundle), shift=bundle.provenance.get("shift"), cv=bundle.provenance.get("cv"),
    )


def _site(bundle: ModelBundle) -> dict[str, Any] | None:
    """What a site calibration (``pneumoscan calibrate --data``) recorded, with a portable name."""
    cal = bundle.provenance.get("calibration") or {}
    data = cal.get("data")
    if not data:
        return None
    return {**data, "name": strip_paths(Path(str(data["description"]).split(" (split ")[0]).name), "date": cal.get("date"),
            "previous": cal.get("previous") or {}}


def portable_paths(value: Any, run_dir: str | Path | None) -> Any:
    """``value`` (a config, or one string of it) with every absolute path made relative to the
    run directory when inside it, else reduced to its last part."""
    if isinstance(value, dict):
        return {k: portable_paths(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [portable_paths(v, run_dir) for v in value]
    if not isinstance(value, str):
        return value
    p = Path(value)
    if p.is_absolute():
        if run_dir is not None:
            try:
                return p.resolve().relative_to(Path(run_dir).resolve()).as_posix()
            except ValueError:
                pass
        return p.name
    return strip_paths(value)


def _section(sec: dict[str, Any], title: str) -> dict[str, Any]:
    """One threshold's metrics table rows (recall left out: it is the sensitivity) and counts."""
    return {"title": title, "n": sec["n"], "n_per_class": sec["n_per_class"], "cm": sec["confusion_matrix"]["value"],
            "rows": [(METRIC_LABELS[k], format_value(sec.get(k)), ci_label(sec.get(k))) for k in METRIC_KEYS if k != "recall"]}


def write_model_card(
    run_dir: str | Path, bundle: ModelBundle | str | Path | None = None, data_card: Mapping[str, Any] | str | Path | None = None,
) -> Path:
    """Write ``MODEL_CARD.md`` for a run (atomically).

    Args:
        run_dir: the run directory.
        bundle: the model to describe, or its file (default ``run_dir/best.pt``).
        data_card: facts about the training data or a data card file (see
            :func:`render_model_card`); ``None``: the data folder's data card or README.

    Returns:
        The path of the card.
    """
    from ..models.bundle import ModelBundle, load_bundle

    run = Path(run_dir)
    model = bundle if isinstance(bundle, ModelBundle) else load_bundle(bundle or run / "best.pt")
    path = run / MODEL_CARD
    atomic_write_text(path, render_model_card(model, run, data_card=data_card))
    log.info("model card: %s", path)
    return path
