"""Imported by the decoding workers' forkserver (``pneumoscan.data.forkserver.PRELOAD``, by name): it
reads the shipped guard's parameters and builds its template bank once, so that every worker
forked from it checks its first image at once. Otherwise each new worker would pay that
start-up (tens of milliseconds, more on a busy machine) inside its first image's decode time
limit.
"""
from __future__ import annotations

import logging

from .core import Guard
from .features import template_bank

log = logging.getLogger(__name__)


def warm() -> bool:
    """Load the shipped guard and its template bank; ``False`` (logged) when that fails: a
    missing or broken guard is reported where it is used, not here."""
    try:
        guard = Guard.default()
        if guard.template is not None:
            template_bank(guard.template)
        return True
    except Exception as e:  # noqa: BLE001 - never stop the forkserver from starting
        log.debug("shipped guard not preloaded: %s", e)
        return False


#: Whether the shipped guard was preloaded.
WARM = warm()
