"""``pneumoscan benchmark train``: training throughput of the real engine loop
(:func:`pneumoscan.training.loop.train_one_epoch` over a cached :class:`XrayDataset` with the
study's augmentation) for several precision / memory-format variants, each against the fp32
eager baseline measured in the same run (interleaved rounds).

Reported per variant: images/s (median of rounds), data vs compute milliseconds per step (the
engine's own accounting, the same numbers ``history.csv`` records), peak RSS and the ratio to
the baseline; optionally one real epoch through :func:`pneumoscan.training.fit`.
"""
from __future__ import annotations

import copy
import itertools
import logging
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..config import AugmentConfig, TrainConfig
from ..data.datasets import XrayDataset, class_counts, load_samples
from ..data.transforms import build_train_transform
from ..errors import ConfigError, WeightsError
from ..models import create_model, get_spec
from ..training.loop import class_weights, train_one_epoch
from ..training.runtime import cpu_supports_bf16, resolve_device
from .common import BenchReport, Stopwatch, VariantResult, interleaved, machine_info, median, peak_rss_mb, reset_peak_rss

log = logging.getLogger(__name__)

#: Kermany train split size: the epoch the seed_cnn target is stated for.
KERMANY_TRAIN_IMAGES = 5216


@dataclass(frozen=True)
class TrainVariant:
    """A precision / memory-format combination.

    Attributes:
        key: short name used on the command line (``fp32``, ``fp32+cl``, ``bf16``, ``bf16+cl``).
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast.
        channels_last: NHWC memory format for model and input.
    """

    key: str
    precision: str
    channels_last: bool

    @property
    def label(self) -> str:
        base = "fp32 eager" if self.precision == "fp32" else f"{self.precision} autocast"
        return base + (" + channels_last" if self.channels_last else "")

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]


def parse_variant(key: str) -> TrainVariant:
    """``fp32``, ``fp32+cl``, ``bf16``, ``bf16+cl``, ``fp16``, ``fp16+cl`` → :class:`TrainVariant`."""
    parts = key.lower().strip().split("+")
    prec = parts[0]
    if prec not in ("fp32", "bf16", "fp16") or any(p != "cl" for p in parts[1:]):
        raise ConfigError(f"unknown training variant '{key}' (use fp32, fp32+cl, bf16, bf16+cl, fp16, fp16+cl)")
    return TrainVariant(key, prec, "cl" in parts[1:])


def engine_auto_variant(device: torch.device) -> str:
    """The variant ``precision=auto, channels_last=auto`` resolves to on ``device``."""
    from ..training.runtime import resolve_channels_last, resolve_precision

    amp = resolve_precision("auto", device)
    prec = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    return prec + ("+cl" if resolve_channels_last("auto", device, amp) else "")


def _cycle(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def _build_model(name: str, weights: str, input_size: int) -> tuple[torch.nn.Module, str]:
    """The model with ImageNet weights when asked for (``auto``: when it has and they load)."""
    spec = get_spec(name)
    if weights == "auto":
        if spec.pretrained:
            try:
                return create_model(name, weights="imagenet", input_size=input_size), "imagenet"
            except WeightsError as e:
                log.warning("ImageNet weights unavailable (%s); timing random init with denormals flushed", e)
        return create_model(name, weights=None, input_size=input_size), "random init"
    if weights in ("none", "random"):
        return create_model(name, weights=None, input_size=input_size), "random init"
    return create_model(name, weights=weights, input_size=input_size), weights


def run_train_benchmark(
    data: str | Path,
    *,
    model: str = "seed_cnn",
    input_size: int | None = None,
    weights: str = "auto",
    images: int = 512,
    batch_size: int = 32,
    steps: int = 6,
    rounds: int = 3,
    warmup: int = 2,
    variants: Sequence[str] = ("fp32", "fp32+cl", "bf16", "bf16+cl"),
    workers: int = 0,
    device: str = "cpu",
    full_epoch: bool = False,
    seed: int = 0,
) -> BenchReport:
    """Measure training images/s of each variant against fp32 eager in the same run.

    Args:
        data: dataset folder or manifest (its ``train`` split is used).
        model: registered model name.
        input_size: square input side (default: the model's).
        weights: ``auto`` (ImageNet where the model has them), ``none`` or a path.
        images: training images to cache and cycle through (decoded once up front).
        batch_size: images per step.
        steps: timed steps per variant per round.
        rounds: interleaved rounds (the median is reported).
        warmup: untimed steps per variant before the rounds.
        variants: variant keys; ``fp32`` (eager baseline) is always measured.
        workers: DataLoader workers.
        device: ``cpu``, ``cuda`` or ``auto``.
        full_epoch: also train one real epoch with :func:`pneumoscan.training.fit` over the
            whole train split (engine defaults: ``precision=auto``), reporting its epoch time.
        seed: seed for the image subset, the initial weights and shuffling.

    Returns:
        The :class:`BenchReport` (variants with images/s, data/compute ms per step, ratio).
    """
    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.set_flush_denormal(True)
    keys = ["fp32"] + [k for k in dict.fromkeys(variants) if k != "fp32"]
    parsed = [parse_variant(k) for k in keys]
    for v in parsed:
        if v.precision == "fp16" and dev.type == "cpu":
            raise ConfigError("fp16 autocast is a GPU variant; on CPUs use bf16")
        if v.precision == "bf16" and dev.type == "cpu" and not cpu_supports_bf16():
            log.warning("this CPU has no native bf16 (AVX512-BF16/AMX): the bf16 variant is emulated and slow")
    spec = get_spec(model)
    size = input_size or spec.input_size

    samples = load_samples(data, "train")
    rng = random.Random(seed)
    if images and images < len(samples):
        samples = sorted(rng.sample(samples, images), key=lambda s: s.path)
    counts = class_counts(samples)
    ds = XrayDataset(samples, build_train_transform(size, AugmentConfig()), cache=True, max_side=max(size * 2, 256))
    with Stopwatch() as sw:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(ds.load_uint8, range(len(ds))))
    decode_ms = sw.seconds / max(len(ds), 1) * 1e3
    bs = min(batch_size, len(ds))

    torch.manual_seed(seed)
    base_model, weight_note = _build_model(model, weights, size)
    loss_w = torch.tensor(class_weights(counts), device=dev) if min(counts) > 0 else None

    state: dict[str, dict[str, Any]] = {}
    for v in parsed:
        m = copy.deepcopy(base_model).to(dev)
        if v.channels_last:
            m = m.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        g = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=bs, shuffle=True, generator=g, drop_last=True, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=dev.type == "cuda",
        )
        state[v.key] = {"v": v, "model": m, "opt": opt, "it": _cycle(loader), "data": 0.0, "compute": 0.0, "steps": 0, "rss": 0.0}

    def run_chunk(key: str, n: int, record: bool) -> tuple[int, float]:
        s = state[key]
        v: TrainVariant = s["v"]
        scaler = torch.amp.GradScaler(dev.type) if v.amp_dtype is torch.float16 else None
        reset_peak_rss()
        st = train_one_epoch(
            s["model"], itertools.islice(s["it"], n), s["opt"], dev, loss_weights=loss_w, amp_dtype=v.amp_dtype,
            scaler=scaler, channels_last=v.channels_last,
        )
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if record:
            s["data"] += st.data_time
            s["compute"] += st.compute_time
            s["steps"] += n
            s["rss"] = max(s["rss"], peak_rss_mb())
        return st.images, st.wall_time

    for key in state:
        run_chunk(key, warmup, record=False)
    per_round = interleaved(
        {k: (lambda k=k: run_chunk(k, steps, record=True)) for k in state}, rounds,
        on_round=lambda n, r, ips: log.info("round %d  %-22s %.1f img/s", r + 1, n, ips),
    )

    auto_key = engine_auto_variant(dev)
    results = []
    for k, s in state.items():
        v = s["v"]
        name = v.label + (" (engine auto)" if k == auto_key else "")
        results.append(VariantResult(
            name=name, baseline=k == "fp32", images_per_s=median(per_round[k]), rounds=[round(x, 2) for x in per_round[k]],
            peak_rss_mb=s["rss"],
            extra={
                "key": k, "data_ms_per_step": s["data"] / max(s["steps"], 1) * 1e3,
                "compute_ms_per_step": s["compute"] / max(s["steps"], 1) * 1e3,
                "epoch_s_projected": KERMANY_TRAIN_IMAGES / max(median(per_round[k]), 1e-9),
            },
        ))
    report = BenchReport(
        benchmark="train",
        title=f"{model} {size}x{size}, batch {bs}, {steps} steps x {rounds} interleaved rounds per variant",
        machine=machine_info(),
        settings={
            "model": model, "input_size": size, "weights": weight_note, "batch_size": bs, "images_cached": len(ds),
            "steps": steps, "rounds": rounds, "warmup_steps": warmup, "workers": workers, "device": str(dev),
            "augmentation": "study default (uint8)", "flush_denormal": dev.type == "cpu",
        },
        variants=results,
        notes=[f"JPEG decode into the uint8 cache: {decode_ms:.2f} ms/image (first epoch only; later epochs read the cache)",
               f"projected {KERMANY_TRAIN_IMAGES}-image epoch: " + ", ".join(
                   f"{r.extra['key']} {r.extra['epoch_s_projected']:.0f}s" for r in results)],
    ).finish()

    auto = next((r for r in results if r.extra["key"] == auto_key), None)
    if auto is not None:
        if model == "seed_cnn" and size == 128:
            report.targets.append({
                "what": f"seed_cnn 128² training, engine auto ({auto_key})", "measured": f"{auto.images_per_s:.1f} img/s",
                "goal": ">= 90 img/s (5,216-image epoch <= 60 s)", "met": auto.images_per_s >= 90.0,
            })
        elif spec.pretrained:
            report.targets.append({
                "what": f"{model} {size}² fine-tune, engine auto ({auto_key}) vs fp32 eager", "measured": f"{auto.ratio:.2f}x",
                "goal": ">= 2x", "met": auto.ratio >= 2.0,
            })
    if full_epoch:
        report.variants.append(_full_epoch(data, model, size, weights if weights not in ("auto",) else ("imagenet" if weight_note == "imagenet" else None), bs, workers, device, seed))
        report.finish()
    return report


def _full_epoch(data: str | Path, model: str, size: int, weights: str | None, bs: int, workers: int, device: str, seed: int) -> VariantResult:
    """One real epoch of ``fit`` over the whole train split (official val, engine defaults)."""
    from ..training import fit

    with tempfile.TemporaryDirectory(prefix="pneumoscan-bench-") as tmp:
        cfg = TrainConfig().override({
            "data.root": str(data), "data.val_source": "official", "data.num_workers": workers, "model.name": model,
            "model.weights": weights, "model.input_size": size, "epochs": 1, "batch_size": bs, "device": device,
            "seed": seed, "progress": False, "calibrate": False,
        })
        reset_peak_rss()
        fit(cfg, Path(tmp) / "run")
        import csv

        with open(Path(tmp) / "run" / "history.csv", encoding="utf-8") as fh:
            row = next(csv.DictReader(fh))
    n_steps = max(1, round(float(row["train_images_per_s"]) * float(row["epoch_time"]) / bs))
    return VariantResult(
        name="full epoch via fit (engine auto)", images_per_s=float(row["train_images_per_s"]), peak_rss_mb=peak_rss_mb(),
        extra={"key": "fit", "epoch_s": float(row["epoch_time"]), "data_ms_per_step": float(row["data_time"]) / n_steps * 1e3,
               "compute_ms_per_step": float(row["compute_time"]) / n_steps * 1e3, "data_s": float(row["data_time"]),
               "compute_s": float(row["compute_time"])},
    )
