"""Inference: the predictor shared by predict, evaluate, serve and ONNX export."""
from __future__ import annotations

from .predictor import Prediction, Predictor, load_predictor

__all__ = ["Prediction", "Predictor", "load_predictor"]
