"""Text from untrusted sources made safe to print: file names, DICOM attributes, decoder messages.

Such text ends up in error messages, logs, tables and terminals. :func:`safe_text` keeps it on
one line, bounded in length, and free of control characters and terminal escape sequences.
"""
from __future__ import annotations

__all__ = ["safe_text"]

_ELLIPSIS = "..."


def _escape(ch: str) -> str:
    """One character as printable text: itself, or a Python-style escape."""
    if ch.isprintable():
        return ch
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte of a file name (surrogateescape): show the byte
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def safe_text(value: object, limit: int = 64) -> str:
    """``value`` as one printable line of at most ``limit`` characters.

    Characters that :meth:`str.isprintable` rejects (control characters such as newline and
    ESC, which starts terminal escape sequences; bidirectional overrides; zero-width and
    other format characters; unassigned code points) become ``\\xNN``, ``\\uNNNN`` or
    ``\\UNNNNNNNN``. Undecodable bytes of a file name (``os.fsdecode``'s surrogate escapes)
    come back as ``\\xNN``; ``bytes`` are decoded as UTF-8 the same way. Longer text is cut
    (never inside an escape) and ends with ``...``. The work is bounded by ``limit``, not by
    the length of ``value``.

    Args:
        value: any object (``None`` gives ``""``); converted with ``str``.
        limit: the most characters returned (at least 4).
    """
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value[: 4 * limit + 4]).decode("utf-8", "surrogateescape")
    else:
        text = str(value)
    limit = max(4, int(limit))
    if len(text) <= limit and text.isprintable():  # the common case: nothing to escape or cut
        return text
    parts: list[str] = []
    used = 0
    for ch in text:
        piece = _escape(ch)
        if used + len(piece) > limit:
            break
        parts.append(piece)
        used += len(piece)
    else:
        return "".join(parts)
    # cut: make room for the ellipsis, dropping whole pieces (an escape is never split)
    while parts and used + len(_ELLIPSIS) > limit:
        used -= len(parts.pop())
    return "".join(parts) + _ELLIPSIS
