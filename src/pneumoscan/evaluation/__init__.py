"""Evaluation: metrics, calibration, operating point, plots and reports."""
from __future__ import annotations
