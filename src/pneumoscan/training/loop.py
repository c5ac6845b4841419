"""One epoch of training and one pass of validation: the class-weighted loss,
``train_one_epoch``, ``predict_logits`` and ``evaluate``. Both passes work on one process or
on every rank of a DDP run (sums and logits are gathered over the ranks)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..core.metrics import roc_auc
from .distributed import DistInfo, all_gather_objects, all_reduce_sum
from .runtime import autocast

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- loss
def class_weights(counts: list[int]) -> list[float]:
    """Keras-style balanced class weights ``N / (2 * n_c)``.

    Args:
        counts: training images per class, ``[n_normal, n_pneumonia]``.
    """
    n = sum(counts)
    return [n / (len(counts) * max(c, 1)) for c in counts]


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None, smoothing: float = 0.0) -> torch.Tensor:
    """Binary cross-entropy on logits, each sample weighted by its class weight.

    Args:
        logits: ``(B,)`` or ``(B, 1)`` raw outputs.
        targets: ``(B,)`` 0/1 labels.
        weights: per-class weights (``None``: unweighted mean).
        smoothing: label smoothing towards 0.5.
    """
    t = targets.float()
    if smoothing > 0:
        t = t * (1 - smoothing) + 0.5 * smoothing
    loss = F.binary_cross_entropy_with_logits(logits.float().view(-1), t, reduction="none")
    if weights is not None:
        w = weights[targets.long()]
        return (loss * w).sum() / w.sum()
    return loss.mean()


# --------------------------------------------------------------------------- training
@dataclass
class EpochStats:
    """What one training epoch did, summed (loss, accuracy, images) or averaged (times) over ranks.

    Attributes:
        loss: mean training loss.
        acc: accuracy at logit 0.
        images: images trained on, all ranks.
        data_time: seconds spent waiting for batches.
        compute_time: seconds spent on the device copy, forward, backward and step.
        wall_time: seconds for the whole epoch on this rank.
    """

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
    ema: Any = None,
) -> EpochStats:
    """One pass over ``loader``.

    Args:
        model: the model to train (DDP-wrapped under DDP).
        loader: batches of ``(images, labels)``.
        optimizer: its optimizer.
        device: where to train.
        loss_weights: per-class loss weights.
        amp_dtype: autocast dtype (``None`` = fp32).
        scaler: gradient scaler (fp16 only).
        channels_last: feed NHWC tensors.
        grad_clip: clip the gradient norm to this (0 = off).
        label_smoothing: see :func:`weighted_bce`.
        info: rank layout (sums are reduced over ranks).
        progress: a tqdm bar to advance per step.
        max_steps: stop after this many steps.
        log_every: log every this many steps (0 = never).
        ema: a :class:`~pneumoscan.training.ema.ModelEma` to update after every step.

    Returns:
        Loss and accuracy over all ranks, and the time spent waiting for data (decoding,
        augmentation, collation) vs computing, averaged over ranks.
    """
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
        with autocast(device, amp_dtype):
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
        if ema is not None:
            ema.update(model)
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


# --------------------------------------------------------------------------- validation
@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of every batch in ``loader`` (this process's share only).

    Args:
        model: the model (put in eval mode).
        loader: batches of ``(images, labels)``.
        device: where to run it.
        amp_dtype: autocast dtype (``None`` = fp32).
        channels_last: feed NHWC tensors.
    """
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            out = model(x)
        logits.append(out.float().view(-1).cpu().numpy())
        labels.append(np.asarray(y).reshape(-1))
    if not logits:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    return np.concatenate(logits), np.concatenate(labels).astype(np.int64)


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    *,
    batch_size: int = 64,
    loss_weights: torch.Tensor | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    info: DistInfo = DistInfo(),
    num_workers: int = 0,
) -> dict[str, Any]:
    """Validation loss (class-weighted, as in training), accuracy at 0.5 and ROC-AUC. Under
    DDP each rank scores a disjoint shard and the logits are gathered.

    Args:
        model: the unwrapped model.
        dataset: the validation images.
        device: where to run it.
        batch_size: images per forward pass.
        loss_weights: per-class loss weights.
        amp_dtype: autocast dtype (``None`` = fp32).
        channels_last: feed NHWC tensors.
        info: rank layout.
        num_workers: DataLoader workers.

    Returns:
        ``loss``, ``acc``, ``auc``, ``logits`` and ``labels`` (all ranks, dataset order).
    """
    idx = list(range(info.rank, len(dataset), info.world_size))
    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    lg, lb = predict_logits(model, loader, device, amp_dtype, channels_last)
    parts = all_gather_objects((idx, lg.tolist(), lb.tolist()), info)
    logits = np.zeros(len(dataset), np.float64)
    labels = np.zeros(len(dataset), np.int64)
    for ids, z, y in parts:
        logits[ids] = z
        labels[ids] = y
    weights = loss_weights.cpu() if loss_weights is not None else None
    loss = float(weighted_bce(torch.as_tensor(logits, dtype=torch.float32), torch.as_tensor(labels), weights))
    acc = float(((logits > 0).astype(np.int64) == labels).mean()) if labels.size else float("nan")
    auc = roc_auc(labels, logits) if labels.size else float("nan")
    return {"loss": loss, "acc": acc, "auc": auc, "logits": logits, "labels": labels}
