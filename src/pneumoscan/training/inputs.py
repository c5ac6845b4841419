"""The data of a training run: the patient-grouped split or cross-validation fold (written to,
and on resume read from, the run directory), the datasets and the training loader with its
sampler and seeded generator."""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, WeightedRandomSampler

from ..config import TrainConfig
from ..core.labels import CLASS_NAMES
from ..data.datasets import Sample, XrayDataset, class_counts, load_samples, read_manifest, write_manifest
from ..data.splits import grouped_stratified_kfold, grouped_stratified_split, parse_fold_source
from ..data.transforms import build_eval_transform, build_train_transform
from ..errors import ConfigError, DataError
from .distributed import DistInfo
from .loop import class_weights

log = logging.getLogger(__name__)

#: The split files of a run directory, by side.
SPLIT_FILES = {"train": "split_train.csv", "val": "split_val.csv"}


@dataclass
class RunData:
    """What a run trains and validates on.

    Attributes:
        train: training samples.
        val: validation samples.
        counts: training images per class.
        train_loader: the training batches.
        sampler: the loader's sampler (``None``: plain shuffling).
        generator: the loader's random stream (saved in ``last.pt`` so a resumed run continues it).
        val_dataset: the validation images.
    """

    train: list[Sample]
    val: list[Sample]
    counts: list[int]
    train_loader: DataLoader
    sampler: Any
    generator: torch.Generator
    val_dataset: XrayDataset

    def describe(self, cfg: TrainConfig) -> dict[str, Any]:
        """The data part of a checkpoint's provenance: where it came from and how much of it."""
        return {
            "root": str(cfg.data.root), "train_split": cfg.data.train_split, "val_source": cfg.data.val_source,
            "n_train": len(self.train), "n_val": len(self.val),
            "train_counts": dict(zip(CLASS_NAMES, self.counts)), "val_counts": dict(zip(CLASS_NAMES, class_counts(self.val))),
        }


def prepare_splits(cfg: TrainConfig, out_dir: Path, info: DistInfo, resume: bool) -> tuple[list[Sample], list[Sample]]:
    """Train and validation samples; the split is written to (or, on resume, read from)
    ``out_dir/split_{train,val}.csv`` so a run always sees the same patients.

    Args:
        cfg: the run configuration.
        out_dir: the run directory.
        info: rank layout (rank 0 writes the files).
        resume: read the split of the interrupted run.

    Raises:
        ConfigError: no data root.
        DataError: a validation manifest that shares patients with train.
    """
    tr_m, va_m = out_dir / SPLIT_FILES["train"], out_dir / SPLIT_FILES["val"]
    if resume and tr_m.is_file() and va_m.is_file():
        return read_manifest(tr_m), read_manifest(va_m)
    samples = training_samples(cfg)
    src = cfg.data.val_source
    fold = parse_fold_source(src)
    if src == "grouped":
        train, val = grouped_stratified_split(samples, cfg.data.val_fraction, cfg.data.split_seed)
    elif fold is not None:
        folds = grouped_stratified_kfold(samples, fold[1], cfg.data.split_seed)
        val = folds[fold[0] - 1]
        held = set(val)
        train = [s for s in samples if s not in held]
    elif src == "official":
        train, val = samples, load_samples(cfg.data.root, "val")
    else:
        train, val = samples, read_manifest(src, columns=cfg.data.columns)
        leaked = {s.patient for s in train} & {s.patient for s in val}
        if leaked:
            raise DataError(f"validation manifest shares {len(leaked)} patient(s) with train (e.g. {sorted(leaked)[0]})")
    if info.is_main:
        write_manifest([_abs(s) for s in train], tr_m, "train")
        write_manifest([_abs(s) for s in val], va_m, "val")
    return train, val


def training_samples(cfg: TrainConfig) -> list[Sample]:
    """The images a run splits into train and validation: ``cfg.data.train_split`` of
    ``cfg.data.root``, at most ``cfg.data.limit`` of them (a seeded sample).

    Args:
        cfg: the run configuration.

    Raises:
        ConfigError: no data root.
    """
    if not cfg.data.root:
        raise ConfigError("no training data: pass --data DIR (or set data.root)")
    samples = load_samples(cfg.data.root, cfg.data.train_split, cfg.data.columns)
    if cfg.data.limit and cfg.data.limit < len(samples):
        rng = random.Random(cfg.seed)
        samples = sorted(rng.sample(samples, cfg.data.limit), key=lambda s: s.path)
    return samples


def _abs(s: Sample) -> Sample:
    return Sample(str(Path(s.path).resolve()), s.label, s.patient)


def build_data(cfg: TrainConfig, out_dir: Path, info: DistInfo, resume: bool, input_size: int, device: torch.device) -> RunData:
    """The split, the datasets and the training loader of a run.

    Args:
        cfg: the run configuration.
        out_dir: the run directory (split files).
        info: rank layout (each rank gets its own shard and random stream under DDP).
        resume: reuse the run's split files.
        input_size: the network's input side.
        device: the training device (pinned memory on CUDA).

    Raises:
        DataError: a training split with a single class.
        ConfigError: the weighted sampler under DDP.
    """
    train_s, val_s = prepare_splits(cfg, out_dir, info, resume)
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
    sampler: Any = None
    if cfg.class_balance == "sampler":
        if info.enabled:
            raise ConfigError("class_balance=sampler is not supported under DDP; use weighted_loss")
        w = class_weights(counts)
        sampler = WeightedRandomSampler([w[s.label] for s in train_s], len(train_s), generator=g)
    elif info.enabled:
        sampler = DistributedSampler(train_ds, info.world_size, info.rank, shuffle=True, seed=cfg.seed)
    nw = cfg.data.num_workers
    per_rank = len(sampler) if sampler is not None else len(train_ds)  # drop the last partial batch only if a full one exists
    loader = DataLoader(
        train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, generator=g,
        num_workers=nw, persistent_workers=nw > 0, pin_memory=device.type == "cuda", drop_last=per_rank > cfg.batch_size,
    )
    return RunData(train_s, val_s, counts, loader, sampler, g, val_ds)


def _prefill_cache(ds: XrayDataset, info: DistInfo) -> None:
    """Decode every image into ``ds``'s cache (threads: Pillow releases the GIL) before
    DataLoader workers start, so they share one decoded copy instead of each decoding again."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(ds.load_uint8, range(len(ds))))
    if info.is_main:
        log.info("decoded %d training images into the cache in %.1fs", len(ds), time.perf_counter() - t0)
