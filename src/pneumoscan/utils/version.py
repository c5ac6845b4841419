"""The installed pneumoscan version (one definition; the package and reports read it here)."""
from __future__ import annotations

__version__ = "0.1.0"
