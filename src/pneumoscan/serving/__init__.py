"""The pneumoscan web service: a FastAPI app (``/v1/predict``, ``/v1/model``, ``/healthz``,
offline ``/docs``) and the browser page at ``/``. Needs the ``serve`` extra
(``pip install 'pneumoscan[serve]'``)."""
from __future__ import annotations

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str):  # lazy: importing pneumoscan.serving must not need FastAPI
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
