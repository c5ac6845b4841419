"""The training loop: ``train_one_epoch``, ``evaluate`` and ``fit``.

``fit`` trains a registered model with the study's scheme (class-weighted loss, Adam or
SGD, reduce-LR-on-plateau, early stopping, best-validation-loss checkpoint after a minimum
epoch), then fits temperature scaling and the operating threshold on the validation split and
stores them in ``best.pt``. It runs unchanged under ``torchrun`` (DDP).
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, WeightedRandomSampler

from ..config import TrainConfig
from ..data.datasets import CLASS_NAMES, Sample, XrayDataset, class_counts, load_samples, read_manifest, write_manifest
from ..data.splits import grouped_stratified_split
from ..data.transforms import build_eval_transform, build_train_transform
from ..errors import CheckpointError, ConfigError, DataError
from ..core.calibration import fit_temperature, select_threshold, sigmoid
from ..models import count_parameters, create_model, get_spec
from ..utils.io import atomic_write_text
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, cleanup_distributed, setup_distributed

log = logging.getLogger(__name__)

HISTORY_FIELDS = [
    "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr",
    "epoch_time", "data_time", "compute_time", "train_images_per_s", "world_size", "eval_time",
]


# --------------------------------------------------------------------------- runtime choices
def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but CUDA is not available")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AMX or AVX-512 BF16)."""
    cpu = getattr(torch, "cpu", None)
    for fn in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        f = getattr(cpu, fn, None)
        if f is not None:
            try:
                if f():
                    return True
            except Exception:  # noqa: BLE001
                pass
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device`` (``None`` = fp32)."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_supports_bf16():
            return torch.bfloat16
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type == "cpu":
            raise ConfigError("fp16 autocast is for GPUs; use bf16 on CPUs")
        return torch.float16
    raise ConfigError(f"unknown precision '{precision}'")


def resolve_channels_last(setting: str, device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """Whether to train/evaluate in ``channels_last`` memory format.

    ``auto`` is on for CUDA and for CPUs with oneDNN (its convolutions run on NHWC without
    reordering: measured 1.5-1.6x faster for fp32 and bf16 alike, see docs/benchmarks.md).

    Args:
        setting: ``"auto"``, ``"on"`` or ``"off"``.
        device: the training device.
        amp_dtype: the autocast dtype (unused by ``auto`` since channels_last helps fp32 too).
    """
    if setting == "on":
        return True
    if setting == "off":
        return False
    return device.type == "cuda" or (device.type == "cpu" and torch.backends.mkldnn.is_available())


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- loss
def class_weights(counts: list[int]) -> list[float]:
    """Keras-style balanced class weights ``N / (2 * n_c)`` from the train counts."""
    n = sum(counts)
    return [n / (len(counts) * max(c, 1)) for c in counts]


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None, smoothing: float = 0.0) -> torch.Tensor:
    """Binary cross-entropy on logits, each sample weighted by its class weight."""
    t = targets.float()
    if smoothing > 0:
        t = t * (1 - smoothing) + 0.5 * smoothing
    loss = F.binary_cross_entropy_with_logits(logits.float().view(-1), t, reduction="none")
    if weights is not None:
        w = weights[targets.long()]
        return (loss * w).sum() / w.sum()
    return loss.mean()


# --------------------------------------------------------------------------- epoch loops
@dataclass
class EpochStats:
    loss: float
    acc: float
    images: int
    data_time: float
    compute_time: float
    wall_time: float


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    loss_weights: torch.Tensor | None = None,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    grad_clip: float = 0.0,
    label_smoothing: float = 0.0,
    info: DistInfo = DistInfo(),
    progress: Any = None,
    max_steps: int | None = None,
    log_every: int = 0,
) -> EpochStats:
    """One pass over ``loader``; returns the loss and accuracy over all ranks and the time
    spent waiting for data (decoding, augmentation, collation) vs computing (copy to the
    device, forward, backward, optimizer step), both averaged over ranks."""
    model.train()
    tot_loss = tot_correct = tot_n = 0.0
    data_time = compute_time = 0.0
    start = t0 = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        t1 = time.perf_counter()
        data_time += t1 - t0
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = model(x)
        loss = weighted_bce(logits, y, loss_weights, label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        with torch.no_grad():
            n = y.numel()
            tot_loss += float(loss) * n
            tot_correct += float(((logits.float().view(-1) > 0).long() == y).sum())
            tot_n += n
        t0 = time.perf_counter()
        compute_time += t0 - t1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{tot_loss / max(tot_n, 1):.4f}", refresh=False)
        if log_every and (step + 1) % log_every == 0 and info.is_main:
            log.info("  step %d: loss %.4f, acc %.3f, %.1f img/s", step + 1, tot_loss / max(tot_n, 1),
                     tot_correct / max(tot_n, 1), tot_n / max(time.perf_counter() - start, 1e-9))
        if max_steps is not None and step + 1 >= max_steps:
            break
    wall = time.perf_counter() - start
    tot_loss, tot_correct, tot_n, data_time, compute_time = all_reduce_sum(
        [tot_loss, tot_correct, tot_n, data_time, compute_time], device, info
    )
    ws = max(info.world_size, 1)
    return EpochStats(tot_loss / max(tot_n, 1), tot_correct / max(tot_n, 1), int(tot_n), data_time / ws, compute_time / ws, wall)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of every batch in ``loader`` (this process's share only)."""
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp_dtype):
            out = model(x)
        logits.append(out.float().view(-1).cpu().numpy())
        labels.append(np.asarray(y).reshape(-1))
    if not logits:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    return np.concatenate(logits), np.concatenate(labels).astype(np.int64)


def evaluate(
    model: nn.Module,
    dataset: XrayDataset,
    device: torch.device,
    *,
    batch_size: int = 64,
    loss_weights: torch.Tensor | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    info: DistInfo = DistInfo(),
    num_workers: int = 0,
) -> dict[str, Any]:
    """Validation loss (class-weighted, as in training), accuracy at 0.5 and ROC-AUC.
    Under DDP each rank scores a disjoint shard and the logits are gathered.

    Returns:
        dict with ``loss``, ``acc``, ``auc``, ``logits`` and ``labels`` (all ranks, dataset order).
    """
    idx = list(range(info.rank, len(dataset), info.world_size))
    sub = torch.utils.data.Subset(dataset, idx)
    loader = DataLoader(sub, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    lg, lb = predict_logits(model, loader, device, amp_dtype, channels_last)
    parts = all_gather_objects((idx, lg.tolist(), lb.tolist()), info)
    logits = np.zeros(len(dataset), np.float64)
    labels = np.zeros(len(dataset), np.int64)
    for ids, l, y in parts:
        logits[ids] = l
        labels[ids] = y
    t = torch.as_tensor(logits, dtype=torch.float32)
    yt = torch.as_tensor(labels)
    loss = float(weighted_bce(t, yt, loss_weights.cpu() if loss_weights is not None else None))
    acc = float(((logits > 0).astype(np.int64) == labels).mean()) if len(labels) else float("nan")
    return {"loss": loss, "acc": acc, "auc": roc_auc(labels, logits), "logits": logits, "labels": labels}


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC, NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, scores))


# --------------------------------------------------------------------------- data set-up
def prepare_splits(cfg: TrainConfig, out_dir: Path, info: DistInfo, resume: bool) -> tuple[list[Sample], list[Sample]]:
    """Train and validation samples; the split is written to (or, on resume, read from)
    ``out_dir/split_{train,val}.csv`` so a run always sees the same patients."""
    tr_m, va_m = out_dir / "split_train.csv", out_dir / "split_val.csv"
    if resume and tr_m.is_file() and va_m.is_file():
        return read_manifest(tr_m), read_manifest(va_m)
    if not cfg.data.root:
        raise ConfigError("no training data: pass --data DIR (or set data.root)")
    samples = load_samples(cfg.data.root, cfg.data.train_split)
    if cfg.data.limit and cfg.data.limit < len(samples):
        rng = random.Random(cfg.seed)
        samples = sorted(rng.sample(samples, cfg.data.limit), key=lambda s: s.path)
    src = cfg.data.val_source
    if src == "grouped":
        train, val = grouped_stratified_split(samples, cfg.data.val_fraction, cfg.data.split_seed)
    elif src == "official":
        train, val = samples, load_samples(cfg.data.root, "val")
    else:
        train, val = samples, read_manifest(src)
        leaked = {s.patient for s in train} & {s.patient for s in val}
        if leaked:
            raise DataError(f"validation manifest shares {len(leaked)} patient(s) with train (e.g. {sorted(leaked)[0]})")
    if info.is_main:
        write_manifest([_abs(s) for s in train], tr_m, "train")
        write_manifest([_abs(s) for s in val], va_m, "val")
    return train, val


def _abs(s: Sample) -> Sample:
    return Sample(str(Path(s.path).resolve()), s.label, s.patient)


# --------------------------------------------------------------------------- fit
def fit(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg.model.name`` and write the run directory.

    Args:
        cfg: the run configuration (on resume, the run's own ``config.yaml`` is used).
        out_dir: run directory; receives ``config.yaml``, ``split_*.csv``, ``history.csv``,
            ``last.pt``, ``best.pt``, ``curves.png`` and ``train.log``.
        resume: continue an interrupted run in ``out_dir`` from its ``last.pt``.

    Returns:
        Summary dict: best epoch, best validation loss, validation metrics at the operating
        point, threshold, temperature, paths.
    """
    out = Path(out_dir)
    if resume:
        cfg_file = out / "config.yaml"
        if not (out / "last.pt").is_file() or not cfg_file.is_file():
            raise CheckpointError(f"nothing to resume in {out} (needs config.yaml and last.pt)")
        cfg = TrainConfig.from_yaml(cfg_file)
    cfg.validate()
    device = resolve_device(cfg.device)
    info = setup_distributed(device.type)
    try:
        return _fit(cfg, out, resume, device, info)
    finally:
        cleanup_distributed()


def _fit(cfg: TrainConfig, out: Path, resume: bool, device: torch.device, info: DistInfo) -> dict[str, Any]:
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    out.mkdir(parents=True, exist_ok=True)
    file_handler = _attach_file_log(out / "train.log") if info.is_main else None
    try:
        seed_everything(cfg.seed, cfg.deterministic)
        if device.type == "cpu":
            torch.set_flush_denormal(True)  # denormal weights/activations are 10-100x slower on x86
        elif device.type == "cuda" and not cfg.deterministic:
            torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
        amp_dtype = resolve_precision(cfg.precision, device)
        scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None
        channels_last = resolve_channels_last(cfg.channels_last, device, amp_dtype)
        spec = get_spec(cfg.model.name)
        input_size = cfg.model.input_size or spec.input_size
        if info.is_main and not resume:
            atomic_write_text(out / "config.yaml", cfg.to_yaml())

        train_s, val_s = prepare_splits(cfg, out, info, resume)
        counts = class_counts(train_s)
        if min(counts) == 0:
            raise DataError(f"training split has only one class (NORMAL={counts[0]}, PNEUMONIA={counts[1]})")
        max_side = max(input_size * 2, 256)
        train_ds = XrayDataset(train_s, build_train_transform(input_size, cfg.augment), cfg.data.cache, max_side)
        val_ds = XrayDataset(val_s, build_eval_transform(input_size), cfg.data.cache, max_side)

        if cfg.data.num_workers > 0 and cfg.data.cache:
            _prefill_cache(train_ds, info)  # decoded once here, shared by the workers it forks
        # per-rank stream for worker seeds (augmentation differs between ranks under DDP)
        g = torch.Generator().manual_seed(cfg.seed + (1_000_003 * info.rank if info.enabled else 0))
        if cfg.class_balance == "sampler":
            if info.enabled:
                raise ConfigError("class_balance=sampler is not supported under DDP; use weighted_loss")
            w = class_weights(counts)
            sampler: Any = WeightedRandomSampler([w[s.label] for s in train_s], len(train_s), generator=g)
        elif info.enabled:
            sampler = DistributedSampler(train_ds, info.world_size, info.rank, shuffle=True, seed=cfg.seed)
        else:
            sampler = None
        nw = cfg.data.num_workers
        per_rank = len(sampler) if sampler is not None else len(train_ds)  # drop the last partial batch only if a full one exists
        train_loader = DataLoader(
            train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, generator=g,
            num_workers=nw, persistent_workers=nw > 0, pin_memory=device.type == "cuda", drop_last=per_rank > cfg.batch_size,
        )
        loss_w = torch.tensor(class_weights(counts), device=device) if cfg.class_balance == "weighted_loss" else None

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
        optimizer = _make_optimizer(cfg, model)
        scheduler = _make_scheduler(cfg, optimizer)

        state = {"epoch": 0, "best_loss": math.inf, "best_epoch": 0, "bad_epochs": 0, "history": [], "stopped": False}
        if resume:
            last = load_checkpoint(out / "last.pt")
            model.load_state_dict(last["state_dict"])
            optimizer.load_state_dict(last["optimizer"])
            if scheduler is not None and last.get("scheduler"):
                scheduler.load_state_dict(last["scheduler"])
            state.update({k: last[k] for k in ("epoch", "best_loss", "best_epoch", "bad_epochs", "history", "stopped") if k in last})
            if last.get("torch_rng") is not None:
                torch.set_rng_state(last["torch_rng"])
            if last.get("loader_rng") is not None and not info.enabled:
                g.set_state(last["loader_rng"])  # the shuffle order continues where it stopped
            if info.is_main:
                log.info("resuming %s from epoch %d (best val loss %.4f at epoch %d)", out, state["epoch"], state["best_loss"], state["best_epoch"])

        if info.enabled:
            # independent dropout/augmentation per rank (weights are broadcast from rank 0 by DDP)
            torch.manual_seed(cfg.seed + 1_000_003 * info.rank + state["epoch"])
        ddp_model = _wrap(model, device, info)
        n_params = count_parameters(model)
        if info.is_main:
            log.info(
                "training %s (%s trainable parameters, input %d², %s) on %s, world size %d, precision %s, channels_last %s",
                cfg.model.name, f"{n_params:,}", input_size, cfg.model.weights or "random init", device, info.world_size,
                str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32", channels_last,
            )
            log.info("train %d images (NORMAL %d, PNEUMONIA %d), validation %d images (%s)", len(train_s), counts[0], counts[1], len(val_s), cfg.data.val_source)

        prep = spec.preprocessing(input_size)
        base = {
            "model_name": cfg.model.name,
            "model_kwargs": {"input_size": input_size, **({"dropout": cfg.model.dropout} if cfg.model.dropout is not None else {})},
            "config": cfg.to_dict(),
            "class_names": list(CLASS_NAMES),
            "preprocessing": prep.to_dict(),
            "trainable_parameters": n_params,
        }
        stop = state["stopped"]
        epoch = state["epoch"]
        while not stop and epoch < cfg.epochs:
            epoch += 1
            if cfg.model.freeze_backbone and cfg.model.unfreeze_at_epoch and epoch >= cfg.model.unfreeze_at_epoch and getattr(model, "_backbone_frozen", False):
                model.set_backbone_trainable(True)
                ddp_model = _wrap(model, device, info)
                if info.is_main:
                    log.info("epoch %d: backbone unfrozen (%s trainable parameters)", epoch, f"{count_parameters(model):,}")
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
            bar = _progress(len(train_loader), f"epoch {epoch}/{cfg.epochs}", cfg.progress and info.is_main)
            try:
                st = train_one_epoch(
                    ddp_model, train_loader, optimizer, device, loss_weights=loss_w, amp_dtype=amp_dtype, scaler=scaler,
                    channels_last=channels_last, grad_clip=cfg.optim.grad_clip, label_smoothing=cfg.label_smoothing,
                    info=info, progress=bar, log_every=cfg.log_every,
                )
            finally:
                if bar is not None:
                    bar.close()
            if info.enabled:
                average_buffers(model, info)  # BN running stats drift apart per rank; keep ranks identical
            t_eval = time.perf_counter()
            ev = evaluate(model, val_ds, device, batch_size=max(cfg.batch_size, 64), loss_weights=loss_w, amp_dtype=amp_dtype, channels_last=channels_last, info=info)
            lr = optimizer.param_groups[0]["lr"]
            if scheduler is not None:
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(ev["loss"])
                else:
                    scheduler.step()
            row = {
                "epoch": epoch, "train_loss": st.loss, "train_acc": st.acc, "val_loss": ev["loss"], "val_acc": ev["acc"],
                "val_auc": ev["auc"], "lr": lr, "epoch_time": st.wall_time, "data_time": st.data_time,
                "compute_time": st.compute_time, "train_images_per_s": st.images / max(st.wall_time, 1e-9), "world_size": info.world_size,
                "eval_time": time.perf_counter() - t_eval,
            }
            state["history"].append(row)
            improved = ev["loss"] < state["best_loss"] - 1e-6 and epoch >= cfg.min_epoch_for_best
            if improved:
                state["best_loss"], state["best_epoch"], state["bad_epochs"] = ev["loss"], epoch, 0
            elif epoch >= cfg.min_epoch_for_best:
                state["bad_epochs"] += 1
            if cfg.early_stopping_patience and state["bad_epochs"] >= cfg.early_stopping_patience:
                stop = True
            state["epoch"], state["stopped"] = epoch, stop
            if info.is_main:
                log.info(
                    "epoch %d/%d  train loss %.4f acc %.3f | val loss %.4f acc %.3f auc %.4f | lr %.2e | %.1fs (data %.1fs, compute %.1fs, %.0f img/s)%s",
                    epoch, cfg.epochs, st.loss, st.acc, ev["loss"], ev["acc"], ev["auc"], lr, st.wall_time, st.data_time,
                    st.compute_time, row["train_images_per_s"], "  *best*" if improved else "",
                )
                sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
                ckpt = {
                    **base, "state_dict": sd, "epoch": epoch, "best_loss": state["best_loss"], "best_epoch": state["best_epoch"],
                    "bad_epochs": state["bad_epochs"], "stopped": stop, "history": state["history"],
                    "val_logits": ev["logits"].tolist(), "val_labels": ev["labels"].tolist(),
                }
                if improved:
                    save_checkpoint({**ckpt, "threshold": 0.5, "temperature": 1.0, "threshold_method": None}, out / "best.pt")
                save_checkpoint(
                    {**ckpt, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None, "torch_rng": torch.get_rng_state(), "loader_rng": g.get_state()},
                    out / "last.pt",
                )
                write_history(state["history"], out / "history.csv")
            barrier(info)
            if stop and info.is_main:
                log.info("early stopping: no val-loss improvement for %d epochs", state["bad_epochs"])

        summary: dict[str, Any] = {"run_dir": str(out), "epochs_run": state["epoch"], "world_size": info.world_size}
        summary.update(_check_ranks_in_sync(model, info))
        if info.is_main:
            if not (out / "best.pt").is_file():
                # min_epoch_for_best beyond the epochs run: fall back to the last epoch
                last = load_checkpoint(out / "last.pt")
                save_checkpoint({k: v for k, v in last.items() if k not in ("optimizer", "scheduler", "torch_rng", "loader_rng", "_path")} | {"threshold": 0.5, "temperature": 1.0, "threshold_method": None}, out / "best.pt")
            summary.update(finalize_run(out, cfg))
            _plot_curves(state["history"], out / "curves.png")
        barrier(info)
        return summary
    finally:
        if file_handler is not None:
            lg = logging.getLogger("pneumoscan")
            lg.removeHandler(file_handler)
            lg.setLevel(file_handler._saved_level)  # type: ignore[attr-defined]
            file_handler.close()


def finalize_run(out: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Fit temperature and threshold on the best epoch's validation logits and store them,
    with validation metrics, in ``best.pt``."""
    best = load_checkpoint(out / "best.pt")
    best.pop("_path", None)
    if (out / "split_val.csv").is_file():
        # calibrate what is deployed: fp32 logits through the prediction path, not the
        # (possibly bf16-autocast) logits seen during training
        logits, labels = deployed_val_logits(best, out / "split_val.csv")
        best.update({"val_logits": logits.tolist(), "val_labels": labels.tolist(), "val_logits_source": "predictor-fp32"})
    logits = np.asarray(best.get("val_logits", []), dtype=np.float64)
    labels = np.asarray(best.get("val_labels", []), dtype=np.int64)
    temperature = fit_temperature(logits, labels) if cfg.calibrate else 1.0
    probs = sigmoid(logits / temperature)
    threshold = select_threshold(probs, labels, cfg.threshold_method, cfg.target_sensitivity)
    metrics = operating_point_metrics(probs, labels, threshold)
    best.update({"threshold": threshold, "temperature": temperature, "threshold_method": cfg.threshold_method, "val_metrics": metrics})
    save_checkpoint(best, out / "best.pt")
    log.info(
        "best epoch %d: val loss %.4f, AUC %.4f; temperature %.3f; threshold %.3f (%s): sensitivity %.3f, specificity %.3f, accuracy %.3f",
        best["best_epoch"], best["best_loss"], metrics["roc_auc"], temperature, threshold, cfg.threshold_method,
        metrics["sensitivity"], metrics["specificity"], metrics["accuracy"],
    )
    from ..evaluation.model_card import write_model_card  # noqa: PLC0415 - evaluation imports training lazily too
    write_model_card(out)
    return {"best_epoch": best["best_epoch"], "best_val_loss": best["best_loss"], "threshold": threshold, "temperature": temperature, "val_metrics": metrics}


def deployed_val_logits(ckpt: dict[str, Any], manifest: Path, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Validation logits of a checkpoint through :class:`~pneumoscan.inference.Predictor`
    (fp32, the same reader and preprocessing as ``predict``/``serve``), so the fitted
    temperature and threshold hold for the deployed model.

    Args:
        ckpt: checkpoint dict.
        manifest: the run's ``split_val.csv``.
        batch_size: images per forward pass.
    """
    from ..data.io import read_image
    from ..inference.predictor import Predictor

    samples = read_manifest(manifest)
    pred = Predictor.from_checkpoint(ckpt, batch_size=batch_size)
    out = []
    for i in range(0, len(samples), batch_size):
        imgs = [read_image(s.path, max_side=pred.input_size) for s in samples[i : i + batch_size]]
        out.append(pred.logits(pred.preprocess(imgs)))
    return np.concatenate(out), np.asarray([s.label for s in samples], dtype=np.int64)


def operating_point_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, sensitivity, specificity and ROC-AUC at a threshold (validation summary)."""
    pred = (probs >= threshold).astype(np.int64)
    pos, neg = labels == 1, labels == 0
    return {
        "n": int(labels.size),
        "accuracy": float((pred == labels).mean()) if labels.size else float("nan"),
        "sensitivity": float(pred[pos].mean()) if pos.any() else float("nan"),
        "specificity": float(1 - pred[neg].mean()) if neg.any() else float("nan"),
        "roc_auc": roc_auc(labels, probs),
        "threshold": float(threshold),
    }


# --------------------------------------------------------------------------- helpers
def _prefill_cache(ds: XrayDataset, info: DistInfo) -> None:
    """Decode every image into ``ds``'s cache (threads: Pillow releases the GIL) before
    DataLoader workers start, so they share one decoded copy instead of each decoding again."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(ds.load_uint8, range(len(ds))))
    if info.is_main:
        log.info("decoded %d training images into the cache in %.1fs", len(ds), time.perf_counter() - t0)


@torch.no_grad()
def average_buffers(model: nn.Module, info: DistInfo) -> None:
    """Average floating-point buffers (BatchNorm running mean/var) across ranks.

    DDP broadcasts rank 0's buffers at each forward, after which every rank updates them with
    its own batch statistics, so ranks end an epoch with slightly different running stats.
    Averaging makes evaluation, checkpoints and every rank's model identical.

    Args:
        model: the unwrapped model.
        info: rank layout.
    """
    if not info.enabled:
        return
    import torch.distributed as dist

    bufs = [b for b in model.buffers() if torch.is_floating_point(b)]
    if not bufs:
        return
    flat = torch.cat([b.detach().reshape(-1).double() for b in bufs])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    i = 0
    for b in bufs:
        n = b.numel()
        b.copy_(flat[i : i + n].view_as(b).to(b.dtype))
        i += n


def state_sha256(model: nn.Module) -> str:
    """sha256 over a model's state dict (names, dtypes, shapes and values, CPU contiguous)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_ranks_in_sync(model: nn.Module, info: DistInfo) -> dict[str, Any]:
    """Hash this rank's final weights and compare with every other rank (DDP sanity check)."""
    mine = state_sha256(model)
    hashes = all_gather_objects(mine, info)
    in_sync = len(set(hashes)) == 1
    if info.enabled and info.is_main:
        if in_sync:
            log.info("final weights identical on all %d ranks (sha256 %s)", info.world_size, mine[:16])
        else:
            log.error("final weights differ between ranks: %s", ", ".join(h[:12] for h in hashes))
    return {"state_sha256": mine, "rank_state_sha256": hashes, "ranks_in_sync": in_sync}


def _wrap(model: nn.Module, device: torch.device, info: DistInfo) -> nn.Module:
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=True)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr)
    return torch.optim.Adam(groups, lr=o.lr)


def _make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    o = cfg.optim
    if o.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=o.plateau_factor, patience=o.plateau_patience)
    if o.scheduler == "cosine":
        warm, total = o.warmup_epochs, cfg.epochs

        def f(e: int) -> float:  # e = epochs completed
            if e < warm:
                return (e + 1) / (warm + 1)
            return 0.5 * (1 + math.cos(math.pi * min(e - warm, total - warm) / max(total - warm, 1)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, f)
    return None


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=None, dynamic_ncols=True)


def _attach_file_log(path: Path) -> logging.Handler:
    """Log INFO and above of the run to ``path``, whatever the stderr verbosity (the logger's
    level is lowered to INFO while the run lasts and restored afterwards)."""
    h = logging.FileHandler(path, encoding="utf-8")
    h.setLevel(logging.INFO)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    lg = logging.getLogger("pneumoscan")
    h._saved_level = lg.level  # type: ignore[attr-defined]
    if lg.getEffectiveLevel() > logging.INFO:
        lg.setLevel(logging.INFO)
    lg.addHandler(h)
    return h


def write_history(rows: list[dict[str, Any]], path: Path) -> None:
    """``history.csv``: one row per epoch (atomic)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def _plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    from ..evaluation.plots import plot_training_curves

    plot_training_curves(rows, path)
