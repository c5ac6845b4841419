"""Workflows: what is built on top of training, inference and evaluation.

- :mod:`.train`: train → calibrate on validation → model card → curves (``pneumoscan train``,
  :func:`pneumoscan.fit`);
- :mod:`.reproduce`: the study's three models and their comparison (``pneumoscan reproduce``);
- :mod:`.guard_fit`, :mod:`.guard_synth`, :mod:`.guard_sources`: fitting the not-a-chest-X-ray guard;
- :mod:`.dicom_output`: DICOM Secondary Captures of heat-map figures (``predict --output-dicom``).

Submodules are imported on use (``from pneumoscan.workflows.train import train``).
"""
from __future__ import annotations
