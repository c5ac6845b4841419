"""Measurement only: ``pneumoscan benchmark {train,predict,serve,quantize,load,precision-parity}``.

Every speed benchmark prints the machine it ran on and compares each variant with a baseline
measured in the same run (see :mod:`pneumoscan.bench.common`). :mod:`~pneumoscan.bench.load`
load-tests a running service (with :mod:`~pneumoscan.bench.storm` for large-upload storms);
:mod:`~pneumoscan.bench.precision_parity` checks that bf16 training learns what fp32 learns.
"""
from __future__ import annotations
