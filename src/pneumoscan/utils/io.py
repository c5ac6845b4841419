"""Atomic file writing: a file is either complete or absent, never half-written.

Writers create a temporary file in the destination folder (``.NAME.XXXX.tmp``), flush and
fsync it, give it the permissions an ordinary new file would get (or those of the file it
replaces), rename it over the destination and fsync the folder. On any exception the temporary
file is removed and the previous file is left untouched. With ``overwrite=False`` an existing
destination is never replaced (the file is published with a hard link, which fails if the
name is taken: no check-then-write race).

An :class:`OSError` raised while writing names the destination (``e.filename``), not the
temporary file, so :func:`os_error_reason` can tell the user which output failed and why.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: The process umask, read once (reading it means setting it, which is not thread-safe).
_UMASK = _current_umask()


def _final_mode(path: Path) -> int:
    """Permission bits for the file that will replace ``path``: its current ones, or what
    ``open()`` would give a new file (0666 minus the umask). ``mkstemp`` alone gives 0600."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_UMASK


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def os_error_reason(e: OSError, *, path: bool = True) -> str:
    """One line for a failed file operation: ``PATH: reason`` (e.g. ``out/x.png: no space left
    on device``), or just the reason when the error names no file.

    Args:
        e: the error (``strerror`` and ``filename`` are used when set).
        path: include the file name; ``False`` gives the reason alone.
    """
    reason = e.strerror or str(e) or e.__class__.__name__
    reason = reason[:1].lower() + reason[1:]
    if not path or e.filename is None:
        return reason
    where = _name_of(e.filename)
    if e.filename2 is not None:
        where += f" -> {_name_of(e.filename2)}"
    return f"{where}: {reason}"


def _name_of(filename: object) -> str:
    return os.fsdecode(filename) if isinstance(filename, (str, bytes, os.PathLike)) else str(filename)


def _name_destination(e: OSError, path: Path, tmp: str | None = None) -> None:
    """Make ``e`` name the destination instead of the temporary file (same type and errno).
    With ``tmp`` given, an error naming some other file (one the caller's block read) is left
    as it is."""
    if e.errno is None:
        return
    if tmp is not None and e.filename is not None and _name_of(e.filename) not in (tmp, str(path)):
        return
    e.filename, e.filename2 = str(path), None


def _publish(tmp: str, path: Path, overwrite: bool) -> None:
    """Move the finished temporary file to ``path`` (replacing it only if ``overwrite``)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic and exclusive: EEXIST if the name is taken
    except FileExistsError:
        raise
    except OSError as e:  # no hard links here (some network/FAT file systems): check, then rename
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(tmp, path)
        return
    with contextlib.suppress(OSError):
        os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", *, overwrite: bool = True, **kwargs) -> Iterator[IO]:
    """Open a temporary file next to ``path`` and rename it over ``path`` on success.

    Args:
        path: final destination.
        mode: ``"w"`` or ``"wb"`` (text or binary).
        overwrite: replace an existing ``path`` (default); ``False`` raises
            :class:`FileExistsError` instead and leaves it untouched.
        **kwargs: passed to :func:`open` (e.g. ``encoding``, ``newline``).

    Raises:
        ValueError: ``mode`` is not a write mode (``w``/``wb``).
        OSError: the file could not be written (``filename`` is ``path``).
    """
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        final_mode = _final_mode(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        _name_destination(e, path)
        raise
    try:
        if "b" not in mode:
            kwargs.setdefault("encoding", "utf-8")
        try:
            fh = os.fdopen(fd, mode, **kwargs)
        except BaseException:
            os.close(fd)
            raise
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, final_mode)
        _publish(tmp, path, overwrite)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            _name_destination(e, path, tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_save_torch(obj: object, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` atomically."""
    import torch

    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path (same folder, same suffix) for writers that need a file name
    (matplotlib, onnx); it is renamed over ``path`` on success.

    Args:
        path: final destination.
        overwrite: replace an existing ``path`` (default); ``False`` raises
            :class:`FileExistsError` instead and leaves it untouched.

    Raises:
        OSError: the file could not be written (``filename`` is ``path``).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        final_mode = _final_mode(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as e:
        _name_destination(e, path)
        raise
    os.close(fd)
    try:
        yield Path(tmp)
        if not os.path.isfile(tmp):
            raise FileNotFoundError(f"the writer produced no file for {path}")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, final_mode)
        _publish(tmp, path, overwrite)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            _name_destination(e, path, tmp)
        raise
    _fsync_dir(path.parent)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
