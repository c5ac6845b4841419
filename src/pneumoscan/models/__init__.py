"""Models: one registry for the study's networks and modern backbones, and the trained-model
bundle. Names are imported on first use, so :mod:`pneumoscan.models.bundle` can be used
without importing PyTorch."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_exports

_LAZY = {
    "ModelSpec": ".registry", "register_model": ".registry",
    "count_parameters": ".factory", "create_model": ".factory", "get_spec": ".factory", "list_models": ".factory",
    "ModelBundle": ".bundle", "BundleRef": ".bundle", "bundle_ref": ".bundle", "load_bundle": ".bundle", "save_bundle": ".bundle",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from .bundle import BundleRef, ModelBundle, bundle_ref, load_bundle, save_bundle
    from .factory import count_parameters, create_model, get_spec, list_models
    from .registry import ModelSpec, register_model

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
