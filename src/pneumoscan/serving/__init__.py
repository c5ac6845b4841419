"""The pneumoscan web service: a FastAPI app (``/v1/predict``, ``/v1/model``, ``/healthz``,
offline ``/docs``) and the browser page at ``/``. Needs the ``serve`` extra
(``pip install 'pneumoscan[serve]'``)."""
from __future__ import annotations

from typing import Any

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:  # lazy: importing pneumoscan.serving must not need FastAPI
    if name == "ServeSettings":
        from .settings import ServeSettings

        return ServeSettings
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
