"""pneumoscan: pneumonia detection on chest X-rays with convolutional neural networks.

The Python API behind the ``pneumoscan`` command::

    from pneumoscan import TrainConfig, fit, create_model, read_image, load_checkpoint
"""
from __future__ import annotations

import logging

from .config import TrainConfig, load_preset
from .data import XrayDataset, grouped_stratified_split, load_samples, read_image
from .errors import PneumoscanError
from .models import count_parameters, create_model, list_models
from .training import fit, load_checkpoint, model_from_checkpoint

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "PneumoscanError", "TrainConfig", "XrayDataset", "__version__", "count_parameters", "create_model", "fit",
    "grouped_stratified_split", "list_models", "load_checkpoint", "load_preset", "load_samples",
    "model_from_checkpoint", "read_image",
]
