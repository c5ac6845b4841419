"""``fit``: train a registered model and write its run directory.

The study's scheme: class-weighted loss, Adam or SGD, reduce-LR-on-plateau (or cosine with
warm-up), early stopping, and a best-validation-loss checkpoint after a minimum epoch. Every
epoch writes ``last.pt`` (a :class:`~pneumoscan.models.bundle.ModelBundle` with the resumable
training state) and, when validation loss improves, ``best.pt`` (the same without it);
``fit(..., resume=True)`` continues from ``last.pt``. Optionally the weights are averaged
(``ema_decay``, :mod:`.ema`), and every epoch also scores a fixed perturbed validation subset
(``shift_val_images``, :mod:`.shift`). It runs unchanged under ``torchrun`` (DDP).
Calibration, the model card and plots come after, in :mod:`pneumoscan.workflows.train`.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DistributedSampler

from ..config import TrainConfig
from ..core.labels import CLASS_NAMES
from ..errors import CheckpointError, ConfigError
from ..models import count_parameters, create_model, get_spec
from ..models.bundle import ModelBundle, default_weight_name, load_bundle, save_bundle
from ..utils.io import atomic_write_text
from .distributed import (
    DistInfo, average_buffers, barrier, check_ranks_in_sync, cleanup_distributed, setup_distributed, wrap_ddp,
)
from .ema import ModelEma
from .inputs import SPLIT_FILES, RunData, build_data
from .loop import class_weights, evaluate, train_one_epoch
from .optim import make_optimizer, make_scheduler
from .runtime import resolve_channels_last, resolve_device, resolve_precision, seed_everything
from .shifted_val import ShiftedValidation

log = logging.getLogger(__name__)

HISTORY_FIELDS = [
    "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr",
    "epoch_time", "data_time", "compute_time", "train_images_per_s", "world_size", "eval_time",
    "val_shift_auc", "val_shift_loss", "val_shift_dprob",
]
#: The counters of a run that ``last.pt`` keeps for ``--resume`` (with optimizer, scheduler and RNG state).
_COUNTERS = ("epoch", "best_loss", "best_epoch", "bad_epochs", "stopped")


@dataclass
class _Run:
    """A training run once set up: its settings, data, model and counters."""

    cfg: TrainConfig
    out: Path
    info: DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    channels_last: bool
    data: RunData
    loss_weights: torch.Tensor | None
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ddp_model: nn.Module  # the model in its DDP wrapper (the model itself in a world of one)
    template: ModelBundle  # architecture, preprocessing and provenance, without weights
    state: dict[str, Any]
    ema: ModelEma | None = None  # the averaged weights (ema_decay > 0): evaluated and checkpointed
    shift: ShiftedValidation | None = None  # the perturbed validation subset (rank 0, shift_val_images > 0)

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated and checkpointed: the average when EMA is on."""
        return self.ema.module if self.ema is not None else self.model


# --------------------------------------------------------------------------- fit
def fit(cfg: TrainConfig | None, out_dir: str | Path, *, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg.model.name`` and write the run directory.

    Args:
        cfg: the run configuration (``None`` on resume: the run's own ``config.yaml`` is used).
        out_dir: run directory; receives ``config.yaml``, ``split_*.csv``, ``history.csv``,
            ``last.pt``, ``best.pt`` and ``train.log``.
        resume: continue an interrupted run in ``out_dir`` from its ``last.pt``.

    Returns:
        Summary: ``run_dir``, ``epochs_run``, ``world_size``, this rank's and every rank's
        weight hash (``state_sha256``, ``rank_state_sha256``, ``ranks_in_sync``),
        ``best_epoch`` and ``best_val_loss``.

    Raises:
        ConfigError: no or an invalid configuration.
        CheckpointError: nothing to resume, or an unreadable ``last.pt``.
    """
    out = Path(out_dir)
    if resume:
        cfg_file = out / "config.yaml"
        if not (out / "last.pt").is_file() or not cfg_file.is_file():
            raise CheckpointError(f"nothing to resume in {out} (needs config.yaml and last.pt)")
        cfg = TrainConfig.from_yaml(cfg_file)
    if cfg is None:
        raise ConfigError("fit needs a configuration unless it resumes a run")
    cfg.validate()
    device = resolve_device(cfg.device)
    info = setup_distributed(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with run_log(out, enabled=info.is_main):
            run = _setup(cfg, out, resume, device, info)
            if resume:
                _restore(run)
            _start(run)
            while not run.state["stopped"] and run.state["epoch"] < cfg.epochs:
                _train_epoch(run, run.state["epoch"] + 1)
            return _finish(run)
    finally:
        cleanup_distributed()


def _setup(cfg: TrainConfig, out: Path, resume: bool, device: torch.device, info: DistInfo) -> _Run:
    """Seeds, precision, data, model, optimizer and scheduler (in this order: same seed, same run)."""
    seed_everything(cfg.seed, cfg.deterministic)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal weights/activations are 10-100x slower on x86
    elif device.type == "cuda" and not cfg.deterministic:
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    amp_dtype = resolve_precision(cfg.precision, device)
    channels_last = resolve_channels_last(cfg.channels_last, device, amp_dtype)
    spec = get_spec(cfg.model.name)
    input_size = cfg.model.input_size or spec.input_size
    if info.is_main and not resume:
        atomic_write_text(out / "config.yaml", cfg.to_yaml())
    data = build_data(cfg, out, info, resume, input_size, device)
    loss_w = torch.tensor(class_weights(data.counts), device=device) if cfg.class_balance == "weighted_loss" else None

    model = create_model(cfg.model.name, weights=cfg.model.weights, input_size=input_size, dropout=cfg.model.dropout)
    if cfg.model.freeze_backbone:
        model.set_backbone_trainable(False)
    if info.enabled and cfg.sync_bn:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif info.is_main:
            log.warning("sync_bn ignored: PyTorch's SyncBatchNorm needs CUDA devices; on %s the BatchNorm "
                        "running statistics are averaged across ranks after every epoch instead", device.type)
    model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    shift = (ShiftedValidation(data.val_dataset, input_size, cfg.shift_val_images, max(cfg.batch_size, 64))
             if cfg.shift_val_images > 0 and info.is_main and len(data.val) else None)
    template = ModelBundle(
        arch=cfg.model.name, preprocessing=spec.preprocessing(input_size), class_names=CLASS_NAMES,
        arch_kwargs={"input_size": input_size, **({"dropout": cfg.model.dropout} if cfg.model.dropout is not None else {})},
        name=default_weight_name(cfg.model.name, input_size, out / "best.pt"),
        provenance={"config": cfg.to_dict(), "data": data.describe(cfg), "split_files": dict(SPLIT_FILES),
                    "trainable_parameters": count_parameters(model)},
    )
    return _Run(
        cfg, out, info, device, amp_dtype, torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None,
        channels_last, data, loss_w, model, optimizer, make_scheduler(cfg, optimizer), model, template,
        state={"epoch": 0, "best_loss": math.inf, "best_epoch": 0, "bad_epochs": 0, "history": [], "stopped": False},
        ema=ema, shift=shift,
    )


def _restore(run: _Run) -> None:
    """Weights, optimizer, scheduler, counters, history and random streams from ``last.pt``."""
    last = load_bundle(run.out / "last.pt")
    tr = last.training
    if not tr.get("optimizer"):
        raise CheckpointError(f"{last.path}: holds no training state to resume from")
    # with EMA, the bundle's weights are the average and the trained weights travel in training
    run.model.load_state_dict(tr.get("raw_state_dict") or last.state_dict)
    if run.ema is not None:
        run.ema.load(last.state_dict, tr.get("ema_steps", 0))
    run.optimizer.load_state_dict(tr["optimizer"])
    if run.scheduler is not None and tr.get("scheduler"):
        run.scheduler.load_state_dict(tr["scheduler"])
    run.state.update({k: tr[k] for k in _COUNTERS if k in tr})
    run.state["history"] = list(last.provenance.get("history") or [])
    if tr.get("torch_rng") is not None:
        torch.set_rng_state(tr["torch_rng"])
    if tr.get("loader_rng") is not None and not run.info.enabled:
        run.data.generator.set_state(tr["loader_rng"])  # the shuffle order continues where it stopped
    if run.info.is_main:
        s = run.state
        log.info("resuming %s from epoch %d (best val loss %.4f at epoch %d)", run.out, s["epoch"], s["best_loss"], s["best_epoch"])


def _start(run: _Run) -> None:
    """Per-rank random streams, the DDP wrapper, and the opening log lines."""
    cfg, info = run.cfg, run.info
    if info.enabled:
        # independent dropout/augmentation per rank (weights are broadcast from rank 0 by DDP)
        torch.manual_seed(cfg.seed + 1_000_003 * info.rank + run.state["epoch"])
    run.ddp_model = wrap_ddp(run.model, run.device, info)
    if info.is_main:
        amp, d = run.amp_dtype, run.data
        log.info(
            "training %s (%s trainable parameters, input %d², %s) on %s, world size %d, precision %s, channels_last %s",
            cfg.model.name, f"{run.template.provenance['trainable_parameters']:,}", run.template.input_size,
            cfg.model.weights or "random init", run.device, info.world_size,
            str(amp).replace("torch.", "") if amp else "fp32", run.channels_last,
        )
        log.info("train %d images (NORMAL %d, PNEUMONIA %d), validation %d images (%s)",
                 len(d.train), d.counts[0], d.counts[1], len(d.val), cfg.data.val_source)


def _train_epoch(run: _Run, epoch: int) -> None:
    """Train and validate one epoch, step the scheduler, update the counters, write checkpoints."""
    cfg, info, model = run.cfg, run.info, run.model
    if cfg.model.freeze_backbone and cfg.model.unfreeze_at_epoch and epoch >= cfg.model.unfreeze_at_epoch and getattr(model, "_backbone_frozen", False):
        model.set_backbone_trainable(True)
        run.ddp_model = wrap_ddp(model, run.device, info)
        if info.is_main:
            log.info("epoch %d: backbone unfrozen (%s trainable parameters)", epoch, f"{count_parameters(model):,}")
    if isinstance(run.data.sampler, DistributedSampler):
        run.data.sampler.set_epoch(epoch)
    bar = _progress(len(run.data.train_loader), f"epoch {epoch}/{cfg.epochs}", cfg.progress and info.is_main)
    try:
        st = train_one_epoch(
            run.ddp_model, run.data.train_loader, run.optimizer, run.device, loss_weights=run.loss_weights,
            amp_dtype=run.amp_dtype, scaler=run.scaler, channels_last=run.channels_last, grad_clip=cfg.optim.grad_clip,
            label_smoothing=cfg.label_smoothing, info=info, progress=bar, log_every=cfg.log_every, ema=run.ema,
        )
    finally:
        if bar is not None:
            bar.close()
    if info.enabled:
        average_buffers(model, info)  # BN running stats drift apart per rank; keep ranks identical
        if run.ema is not None:
            average_buffers(run.ema.module, info)
    t_eval = time.perf_counter()
    ev = evaluate(run.eval_model, run.data.val_dataset, run.device, batch_size=max(cfg.batch_size, 64), loss_weights=run.loss_weights,
                  amp_dtype=run.amp_dtype, channels_last=run.channels_last, info=info)
    shifted = run.shift.evaluate(run.eval_model, ev["logits"], run.device, loss_weights=run.loss_weights, amp_dtype=run.amp_dtype,
                                 channels_last=run.channels_last) if run.shift is not None else {}
    lr = run.optimizer.param_groups[0]["lr"]
    if run.scheduler is not None:
        if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            run.scheduler.step(ev["loss"])
        else:
            run.scheduler.step()
    row = {
        "epoch": epoch, "train_loss": st.loss, "train_acc": st.acc, "val_loss": ev["loss"], "val_acc": ev["acc"],
        "val_auc": ev["auc"], "lr": lr, "epoch_time": st.wall_time, "data_time": st.data_time,
        "compute_time": st.compute_time, "train_images_per_s": st.images / max(st.wall_time, 1e-9), "world_size": info.world_size,
        "eval_time": time.perf_counter() - t_eval, **shifted,
    }
    improved = _count(run, epoch, row, ev["loss"])
    if info.is_main:
        log.info(
            "epoch %d/%d  train loss %.4f acc %.3f | val loss %.4f acc %.3f auc %.4f%s | lr %.2e | %.1fs (data %.1fs, compute %.1fs, %.0f img/s)%s",
            epoch, cfg.epochs, st.loss, st.acc, ev["loss"], ev["acc"], ev["auc"], _shift_text(shifted), lr, st.wall_time, st.data_time,
            st.compute_time, row["train_images_per_s"], "  *best*" if improved else "",
        )
        _save_checkpoints(run, ev, improved)
        write_history(run.state["history"], run.out / "history.csv")
    barrier(info)
    if run.state["stopped"] and info.is_main:
        log.info("early stopping: no val-loss improvement for %d epochs", run.state["bad_epochs"])


def _count(run: _Run, epoch: int, row: dict[str, Any], val_loss: float) -> bool:
    """Record an epoch in the counters (best epoch, early stopping); True if it is the new best."""
    s, cfg = run.state, run.cfg
    s["history"].append(row)
    improved = val_loss < s["best_loss"] - 1e-6 and epoch >= cfg.min_epoch_for_best
    if improved:
        s["best_loss"], s["best_epoch"], s["bad_epochs"] = val_loss, epoch, 0
    elif epoch >= cfg.min_epoch_for_best:
        s["bad_epochs"] += 1
    s["epoch"] = epoch
    s["stopped"] = bool(cfg.early_stopping_patience and s["bad_epochs"] >= cfg.early_stopping_patience)
    return improved


def _save_checkpoints(run: _Run, ev: dict[str, Any], improved: bool) -> None:
    """``last.pt`` every epoch (with the training state), ``best.pt`` when validation improved."""
    s = run.state
    sd = {k: v.detach().cpu().contiguous() for k, v in run.eval_model.state_dict().items()}
    bundle = run.template.replace(state_dict=sd, provenance={
        **run.template.provenance, "history": list(s["history"]), "epoch": s["epoch"], "best_epoch": s["best_epoch"],
        "best_loss": s["best_loss"], "val_logits": ev["logits"].tolist(), "val_labels": ev["labels"].tolist(),
    })
    if improved:
        save_bundle(bundle, run.out / "best.pt")
    training = {
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict() if run.scheduler else None,
        "torch_rng": torch.get_rng_state(), "loader_rng": run.data.generator.get_state(), **{k: s[k] for k in _COUNTERS},
    }
    if run.ema is not None:
        training.update(raw_state_dict={k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()}, ema_steps=run.ema.steps)
    save_bundle(bundle.replace(training=training), run.out / "last.pt")


def _finish(run: _Run) -> dict[str, Any]:
    """Check that the ranks agree, make sure ``best.pt`` exists, and summarise the run."""
    s, info = run.state, run.info
    summary: dict[str, Any] = {"run_dir": str(run.out), "epochs_run": s["epoch"], "world_size": info.world_size}
    summary.update(check_ranks_in_sync(run.model, info))
    if info.is_main and not (run.out / "best.pt").is_file():
        # min_epoch_for_best beyond the epochs run: fall back to the last epoch
        save_bundle(load_bundle(run.out / "last.pt").deployable(), run.out / "best.pt")
    summary.update({"best_epoch": s["best_epoch"], "best_val_loss": s["best_loss"]})
    barrier(info)
    return summary


# --------------------------------------------------------------------------- run-directory files
def write_history(rows: list[dict[str, Any]], path: Path) -> None:
    """``history.csv``: one row per epoch (atomic).

    Args:
        rows: the epochs' rows (keys :data:`HISTORY_FIELDS`).
        path: destination.
    """
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def _shift_text(shifted: dict[str, Any]) -> str:
    """The shifted-validation part of an epoch's log line (empty when it is off)."""
    if not shifted:
        return ""
    return (f" | shifted auc {shifted['val_shift_auc']:.4f} loss {shifted['val_shift_loss']:.4f} "
            f"|dp| {shifted['val_shift_dprob']:.3f} ({shifted['val_shift_time']:.1f}s)")


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=None, dynamic_ncols=True)


@contextlib.contextmanager
def run_log(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Append INFO and above to ``run_dir/train.log`` while the block runs, whatever the stderr
    verbosity (the ``pneumoscan`` logger's level is lowered to INFO meanwhile, then restored).

    Args:
        run_dir: the run directory.
        enabled: ``False`` does nothing (ranks other than 0).
    """
    if not enabled:
        yield
        return
    h = logging.FileHandler(Path(run_dir) / "train.log", encoding="utf-8")
    h.setLevel(logging.INFO)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    lg = logging.getLogger("pneumoscan")
    saved = lg.level
    if lg.getEffectiveLevel() > logging.INFO:
        lg.setLevel(logging.INFO)
    lg.addHandler(h)
    try:
        yield
    finally:
        lg.removeHandler(h)
        lg.setLevel(saved)
        h.close()
