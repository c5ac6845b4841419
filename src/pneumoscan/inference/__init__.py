"""Inference: the predictor shared by predict, evaluate, serve and the benchmarks, its runners
(PyTorch fp32/bf16, onnxruntime fp32/int8), ONNX export and its cache, and int8 quantisation."""
from __future__ import annotations

from .loading import load_predictor
from .predictor import Predictor
from .records import Prediction
from .runners import BACKENDS

__all__ = ["BACKENDS", "Prediction", "Predictor", "load_predictor"]
