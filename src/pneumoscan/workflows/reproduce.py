"""``pneumoscan reproduce``: train the study's three models with their presets, then compare
them on the validation split written by the runs (never on a withheld test set).

``OUT/<model>/`` holds each run (resumed when interrupted), ``OUT/compare/`` the comparison
and ``OUT/reproduce.json`` what was trained, what was skipped and why, and how long it took.
``estimate_run_time`` measures a few training steps per model on the current machine and
projects the run time without training anything (``pneumoscan reproduce --estimate``).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from ..config import TrainConfig, load_preset
from ..core.metrics import DEFAULT_RESAMPLES
from ..data.datasets import Sample, load_samples, read_manifest, write_manifest
from ..errors import ConfigError, DataError, PneumoscanError, WeightsError
from ..utils.io import atomic_write_text

log = logging.getLogger(__name__)

STUDY_MODELS: tuple[str, ...] = ("seed_cnn", "vgg16", "resnet50")


def study_config(model: str, data: str | Path, epochs: int | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The study preset of ``model`` (``study_<model>``) pointed at ``data``.

    Args:
        model: ``seed_cnn``, ``vgg16``, ``resnet50`` (or any model with a ``study_<model>`` preset).
        data: dataset folder or CSV manifest.
        epochs: override the preset's epoch count.
        overrides: further ``{"section.key": value}`` overrides.
    """
    cfg = load_preset(f"study_{model}")
    over: dict[str, Any] = {"data.root": str(data)}
    if epochs is not None:
        over["epochs"] = int(epochs)
        if cfg.min_epoch_for_best > int(epochs):
            # a short run must still be able to pick its best epoch
            over["min_epoch_for_best"] = max(1, int(epochs))
    over.update(overrides or {})
    cfg = cfg.override(over)
    cfg.validate()
    return cfg


def _val_intersection(run_dirs: Sequence[Path]) -> list[Sample]:
    """Validation images common to every run (identical splits give the whole split; an image
    in every run's validation split was in none of their training splits)."""
    splits = [read_manifest(d / "split_val.csv") for d in run_dirs]
    common = set.intersection(*({str(Path(s.path).resolve()) for s in sp} for sp in splits))
    if any(len(sp) != len(common) for sp in splits):
        log.warning("the runs' validation splits differ; comparing on the %d images they share", len(common))
    return [s for s in splits[0] if str(Path(s.path).resolve()) in common]


def reproduce(
    data: str | Path,
    out: str | Path,
    models: Sequence[str] = STUDY_MODELS,
    *,
    epochs: int | None = None,
    overrides: dict[str, Any] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run the study and its model comparison.

    Args:
        data: dataset folder (``ROOT/train/{NORMAL,PNEUMONIA}``) or CSV manifest.
        out: output folder.
        models: study models to train (each needs a ``study_<model>`` preset).
        epochs: override every preset's epoch count (e.g. a quick run).
        overrides: ``{"section.key": value}`` applied to every run (e.g. ``{"device": "cuda"}``).
        n_resamples: bootstrap resamples of the comparison.
        seed: bootstrap seed.
        device: device of the comparison's predictors.

    Returns:
        The content of ``reproduce.json``.

    Raises:
        PneumoscanError: no model could be trained.
    """
    from ..evaluation.compare import compare_models
    from .train import train

    out = Path(out)
    if not models:
        raise ConfigError("no models to reproduce")
    cfgs = {m: study_config(m, data, epochs, overrides) for m in models}  # unknown preset/keys fail before any training
    load_samples(data, cfgs[models[0]].data.train_split, cfgs[models[0]].data.columns)  # a missing data set fails now, not after the first run
    out.mkdir(parents=True, exist_ok=True)
    status: dict[str, dict[str, Any]] = {}
    for m in models:
        run = out / m
        t0 = time.perf_counter()
        try:
            if (run / "last.pt").is_file():
                log.info("%s: resuming the run in %s", m, run)
                summary = train(None, run, resume=True)
            else:
                log.info("%s: training with preset study_%s into %s", m, m, run)
                summary = train(cfgs[m], run)
        except WeightsError as e:
            log.error("%s: skipped — pretrained weights unavailable: %s", m, e)
            status[m] = {"status": "skipped", "reason": str(e), "run_dir": str(run)}
            continue
        status[m] = {
            "status": "trained", "run_dir": str(run), "wall_seconds": time.perf_counter() - t0,
            "epochs_run": summary.get("epochs_run"), "best_epoch": summary.get("best_epoch"),
            "threshold": summary.get("threshold"), "temperature": summary.get("temperature"),
            "val_metrics": summary.get("val_metrics"),
        }
    trained = [m for m in models if status[m]["status"] == "trained"]
    result: dict[str, Any] = {"data": str(data), "out": str(out), "models": status, "epochs_override": epochs, "compare": None}
    if not trained:
        atomic_write_text(out / "reproduce.json", json.dumps(result, indent=2, default=str) + "\n")
        raise PneumoscanError("no study model could be trained: " + "; ".join(f"{m}: {s.get('reason')}" for m, s in status.items()))
    val = _val_intersection([out / m for m in trained])
    if not val:
        raise DataError("the runs share no validation image to compare on")
    manifest = out / "compare" / "val_split.csv"
    write_manifest(val, manifest, "val")
    comp = compare_models([out / m for m in trained], manifest, out / "compare", split="val", n_resamples=n_resamples,
                          seed=seed, device=device)
    result["compare"] = {"dir": str(out / "compare"), "n": comp["n"], "pairs": len(comp["pairs"])}
    atomic_write_text(out / "reproduce.json", json.dumps(result, indent=2, default=str) + "\n")
    skipped = [m for m in models if status[m]["status"] == "skipped"]
    if skipped:
        log.warning("not reproduced (weights unavailable): %s", ", ".join(skipped))
    return result


# --------------------------------------------------------------------------- run-time estimate
def measure_training_speed(
    model: str, *, steps: int = 3, batch_size: int | None = None, device: str = "auto", overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Time a few training steps (and one validation pass) of a study model on synthetic
    input of the right size, with the run's precision, channels-last and freezing choices.
    Weights are randomly initialised: the speed does not depend on them.

    Args:
        model: study model (``study_<model>`` preset).
        steps: timed training steps (after one warm-up step).
        batch_size: images per step (default: the preset's).
        device: ``auto``, ``cpu``, ``cuda``...
        overrides: further config overrides.

    Returns:
        ``train_images_per_s``, ``eval_images_per_s``, ``batch_size``, ``input_size``, ``device``,
        ``precision``.
    """
    import torch

    from ..models import create_model, get_spec
    from ..training.loop import train_one_epoch
    from ..training.optim import make_optimizer
    from ..training.runtime import autocast, resolve_channels_last, resolve_device, resolve_precision

    cfg = load_preset(f"study_{model}").override({"device": device, **(overrides or {})})
    dev = resolve_device(cfg.device)
    amp = resolve_precision(cfg.precision, dev)
    cl = resolve_channels_last(cfg.channels_last, dev, amp)
    size = cfg.model.input_size or get_spec(cfg.model.name).input_size
    bs = batch_size or cfg.batch_size
    net = create_model(cfg.model.name, weights=None, input_size=size, dropout=cfg.model.dropout)
    if cfg.model.freeze_backbone:
        net.set_backbone_trainable(False)
    net.to(dev)
    if cl:
        net = net.to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg, net)
    g = torch.Generator().manual_seed(0)
    batch = (torch.rand(bs, 1, size, size, generator=g), torch.randint(0, 2, (bs,), generator=g))

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    train_one_epoch(net, [batch], opt, dev, amp_dtype=amp, channels_last=cl)  # warm-up
    sync()
    t0 = time.perf_counter()
    train_one_epoch(net, [batch] * steps, opt, dev, amp_dtype=amp, channels_last=cl)
    sync()
    train_s = time.perf_counter() - t0
    net.eval()
    x = batch[0].to(dev)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(dev, amp):
        net(x)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            net(x)
        sync()
    eval_s = time.perf_counter() - t0
    return {
        "model": model, "train_images_per_s": bs * steps / train_s, "eval_images_per_s": bs * steps / eval_s,
        "batch_size": bs, "input_size": size, "device": str(dev), "precision": str(amp).replace("torch.", "") if amp else "fp32",
        "threads": torch.get_num_threads(), "epochs": cfg.epochs, "steps": steps,
    }


def estimate_run_time(
    models: Sequence[str] = STUDY_MODELS, *, n_train: int = 4434, n_val: int = 782, epochs: int | None = None,
    steps: int = 3, batch_size: int | None = None, device: str = "auto",
) -> list[dict[str, Any]]:
    """Projected time per epoch and per run of each study model on this machine, from
    :func:`measure_training_speed` (compute only: image decoding in epoch 1 and early stopping
    are not modelled, so real runs can be shorter or longer).

    Args:
        models: study models.
        n_train: training images per epoch (default: 85% of Kermany's 5,216).
        n_val: validation images per epoch.
        epochs: epochs per run (default: the preset's maximum).
        steps: timed steps per model.
        batch_size: images per step (default: the preset's).
        device: device to measure on.
    """
    rows = []
    for m in models:
        s = measure_training_speed(m, steps=steps, batch_size=batch_size, device=device)
        per_epoch = n_train / s["train_images_per_s"] + n_val / s["eval_images_per_s"]
        ep = epochs or s["epochs"]
        rows.append({**s, "n_train": n_train, "n_val": n_val, "seconds_per_epoch": per_epoch, "epochs": ep, "seconds_per_run": per_epoch * ep})
        log.info("%s: %.1f train img/s, %.1f eval img/s → %.0f s/epoch, %.1f min for %d epochs", m, s["train_images_per_s"],
                 s["eval_images_per_s"], per_epoch, per_epoch * ep / 60, ep)
    return rows
