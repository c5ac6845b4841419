"""Benchmark harness (``pneumoscan benchmark {train,predict,serve,quantize}``) and the CPU
inference fast path it measures: bf16/channels_last model wrapping, threaded decoding, and
ONNX Runtime sessions with accuracy-checked int8 quantisation.

Every benchmark prints the machine it ran on and compares each variant with a baseline
measured in the same run (see :mod:`pneumoscan.bench.common`).
"""
from __future__ import annotations
