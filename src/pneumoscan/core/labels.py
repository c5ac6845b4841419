"""The two classes pneumoscan tells apart. Index 1 is the positive class."""
from __future__ import annotations

#: Class names by label index: 0 = NORMAL, 1 = PNEUMONIA (the positive class).
CLASS_NAMES: tuple[str, str] = ("NORMAL", "PNEUMONIA")
