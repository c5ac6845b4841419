"""Models: one registry for the study's networks and modern backbones."""
from __future__ import annotations

from . import builders as _builders  # noqa: F401  (registers the models)
from .registry import ModelSpec, count_parameters, create_model, get_spec, list_models, register_model

__all__ = ["ModelSpec", "count_parameters", "create_model", "get_spec", "list_models", "register_model"]
