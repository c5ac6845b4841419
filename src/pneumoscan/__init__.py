"""pneumoscan: pneumonia detection on chest X-rays with convolutional neural networks.

The Python API behind the ``pneumoscan`` command::

    from pneumoscan import TrainConfig, fit, create_model, read_image, load_bundle, load_predictor

``fit`` is :func:`pneumoscan.workflows.train.train` (train, calibrate, model card, curves);
``load_bundle`` loads a trained model (a run's ``best.pt``) as a :class:`ModelBundle`;
``load_predictor(checkpoint)`` answers like ``pneumoscan predict`` (same backend choice, the
not-a-chest-X-ray guard on): ``load_predictor(None).predict_image("chest.jpeg")``.

The names are imported on first use (PEP 562), so ``import pneumoscan`` stays cheap and
prediction with the ONNX backend never imports PyTorch.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .errors import PneumoscanError
from .utils.lazy import lazy_exports

from .utils.version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

#: Public name → the module that defines it.
_LAZY = {
    "TrainConfig": ".config", "load_preset": ".config",
    "XrayDataset": ".data.datasets", "load_samples": ".data.datasets",
    "grouped_stratified_split": ".data.splits", "read_image": ".data.io",
    "count_parameters": ".models", "create_model": ".models", "list_models": ".models",
    "fit": ".workflows.train", "ModelBundle": ".models.bundle", "load_bundle": ".models.bundle",
    "load_predictor": ".inference",
}

__all__ = ["PneumoscanError", "__version__", *sorted(_LAZY)]

if TYPE_CHECKING:
    from .config import TrainConfig, load_preset
    from .data.datasets import XrayDataset, load_samples
    from .data.io import read_image
    from .data.splits import grouped_stratified_split
    from .inference import load_predictor
    from .models import count_parameters, create_model, list_models
    from .models.bundle import ModelBundle, load_bundle
    from .workflows.train import fit


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
