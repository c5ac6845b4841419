"""Shifted validation: after every epoch, a fixed subset of the validation images is scored
again under fixed, seeded perturbations of exposure, processing and geometry, so that a model
whose answers move under a darker exposure or a JPEG re-compression shows it in the history
(``val_shift_auc``, ``val_shift_loss``, ``val_shift_dprob``) before it ships.

The cost is bounded: at most ``shift_val_images`` images (default 256) × :data:`SHIFTS`
forward passes per epoch, on perturbed uint8 tensors built once (on first use, from the
validation set's decoded cache) and kept in memory.
"""
from __future__ import annotations

import logging
import math
import random
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torchvision.transforms import InterpolationMode, v2

from ..core.calibration import sigmoid
from ..core.metrics import roc_auc
from ..data.datasets import XrayDataset
from ..data.transforms import add_noise, build_eval_transform, jpeg_recompress, letterbox
from .loop import predict_logits, weighted_bce

log = logging.getLogger(__name__)

#: The seed of the subset and of the noise: the same images and perturbations in every run.
SHIFT_SEED = 0


def _blur(x: torch.Tensor, _g: torch.Generator) -> torch.Tensor:
    sigma = x.shape[-1] / 150.0  # 1.5 pixels at 224: a soft, slightly defocused image
    k = 2 * math.ceil(3 * sigma) + 1
    return v2.functional.gaussian_blur(x, [k, k], [sigma, sigma])


#: The perturbations, by name, on a uint8 ``(1, S, S)`` image at the model's input size.
SHIFTS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "gamma_0.7": lambda x, g: v2.functional.adjust_gamma(x, 0.7),
    "gamma_1.4": lambda x, g: v2.functional.adjust_gamma(x, 1.4),
    "contrast_0.6": lambda x, g: v2.functional.adjust_contrast(x, 0.6),
    "blur": _blur,
    "noise_0.04": lambda x, g: add_noise(x, 0.04, g),
    "jpeg_q30": lambda x, g: jpeg_recompress(x, 30),
    "letterbox_4:3": lambda x, g: letterbox(x, 4 / 3, "width"),
    "rotate_10": lambda x, g: v2.functional.rotate(x, 10.0, interpolation=InterpolationMode.BILINEAR),
}


class ShiftedValidation:
    """The perturbed validation subset of a run and its per-epoch evaluation.

    Args:
        dataset: the validation images.
        size: the model's input side.
        n_images: at most this many images (a seeded random subset, the same every epoch).
        batch_size: images per forward pass.
    """

    def __init__(self, dataset: XrayDataset, size: int, n_images: int, batch_size: int = 64) -> None:
        n = min(n_images, len(dataset))
        self.index = sorted(random.Random(SHIFT_SEED).sample(range(len(dataset)), n))
        self.dataset, self.size, self.batch_size = dataset, size, batch_size
        self.labels = np.asarray([dataset.samples[i].label for i in self.index], dtype=np.int64)
        self._images: torch.Tensor | None = None  # (len(SHIFTS) * n, 1, S, S) uint8, perturbation-major

    def _build(self) -> torch.Tensor:
        t0 = time.perf_counter()
        to_input = build_eval_transform(self.size)
        g = torch.Generator().manual_seed(SHIFT_SEED)
        clean = [(to_input(torch.from_numpy(self.dataset.load_uint8(i)).unsqueeze(0)) * 255).round_().to(torch.uint8) for i in self.index]
        images = torch.stack([fn(x, g) for fn in SHIFTS.values() for x in clean])
        log.info("shifted validation: %d images x %d perturbations prepared in %.1fs (%.0f MB)", len(clean), len(SHIFTS),
                 time.perf_counter() - t0, images.numel() / 2**20)
        return images

    def evaluate(
        self, model: nn.Module, clean_logits: np.ndarray, device: torch.device, *, loss_weights: torch.Tensor | None = None,
        amp_dtype: torch.dtype | None = None, channels_last: bool = False,
    ) -> dict[str, Any]:
        """Score the perturbed images and compare them with the clean ones.

        Args:
            model: the (unwrapped) model to evaluate.
            clean_logits: the logits of the whole validation set, in dataset order.
            device: where to run it.
            loss_weights: per-class loss weights (as the validation loss).
            amp_dtype: autocast dtype (``None`` = fp32).
            channels_last: feed NHWC tensors.

        Returns:
            ``val_shift_auc`` (pooled over the perturbations), ``val_shift_loss``,
            ``val_shift_dprob`` (mean absolute change of the predicted probability),
            ``val_shift_time`` (seconds) and ``val_shift`` (per perturbation: ``auc``,
            ``dprob`` (mean signed change) and ``flips`` (share of answers crossing 0.5)).
        """
        t0 = time.perf_counter()
        if self._images is None:
            self._images = self._build()
        imgs, k = self._images, len(SHIFTS)
        y = np.tile(self.labels, k)
        batches = ((imgs[i : i + self.batch_size].float().div_(255.0), y[i : i + self.batch_size])
                   for i in range(0, len(imgs), self.batch_size))
        z, _ = predict_logits(model, batches, device, amp_dtype, channels_last)
        p = sigmoid(z).reshape(k, -1)
        p0 = sigmoid(np.asarray(clean_logits, dtype=np.float64)[self.index])
        weights = loss_weights.cpu() if loss_weights is not None else None
        detail = {
            name: {"auc": roc_auc(self.labels, p[j]), "dprob": float(np.mean(p[j] - p0)), "flips": float(np.mean((p[j] >= 0.5) != (p0 >= 0.5)))}
            for j, name in enumerate(SHIFTS)
        }
        return {
            "val_shift_auc": roc_auc(y, p.reshape(-1)),
            "val_shift_loss": float(weighted_bce(torch.as_tensor(z, dtype=torch.float32), torch.as_tensor(y), weights)),
            "val_shift_dprob": float(np.mean(np.abs(p - p0[None, :]))),
            "val_shift_time": time.perf_counter() - t0,
            "val_shift": detail,
        }
