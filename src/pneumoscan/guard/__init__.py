"""The not-a-chest-X-ray guard: refuse photographs, documents, screenshots, CT/MR slices,
blank or noise images before a pneumonia probability is given, and accept chest films as
hospitals make them (padded, tilted, cropped, with lines and markers, any bit depth or
polarity).

::

    from pneumoscan.data.io import read_image_with_meta
    from pneumoscan.guard import check

    image, meta = read_image_with_meta("upload.png", max_side=224)
    ok, reason, score = check(image, meta)

See :mod:`pneumoscan.guard.core` for the design and ``docs/guard.md`` for its measured
refusal and acceptance rates.
"""
from __future__ import annotations

from .core import Guard, GuardResult, check, default_guard_path

__all__ = ["Guard", "GuardResult", "check", "default_guard_path"]
