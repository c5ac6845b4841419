"""Lazy package exports (PEP 562): a package names its public objects and the modules that
define them, and each is imported on first access. Keeps ``import pneumoscan`` cheap and the
prediction path free of PyTorch."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, names: dict[str, str], namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of a package that exports ``names`` lazily.

    Args:
        package: the package's ``__name__``.
        names: public name → module defining it, relative to ``package`` (e.g. ``".io"``).
        namespace: the package's ``globals()`` (a loaded name is cached there).

    Returns:
        ``(__getattr__, __dir__)`` to assign at module level.
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module '{package}' has no attribute '{name}'")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
