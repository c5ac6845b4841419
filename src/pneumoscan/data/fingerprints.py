"""The images a model has seen: content digests of its training and calibration images, so that
``predict`` and ``evaluate`` can say when an input is one of them, whatever its file name.

Each image is recorded by two truncated sha256 digests (:mod:`pneumoscan.core.fingerprint`):
of the file's bytes and of its decoded 8-bit greyscale pixels at full resolution. An input
matches when either digest is recorded: a renamed copy by its bytes, a lossless re-save in
another container (JPEG → PNG/BMP, an 8-bit DICOM) by its pixels. A JPEG that the predictor
decodes at reduced size (draft mode, for speed) is matched by its bytes only.

:class:`SeenImages` is stored in a bundle's provenance under ``"seen_images"`` as plain
built-in values (strings and ints: it loads with ``torch.load(weights_only=True)``, travels
as JSON in the ONNX metadata, so the PyTorch-free prediction path checks it too) and costs 32
bytes per image, base64-coded (5,216 images: about 220 kB).
"""
from __future__ import annotations

import base64
import binascii
import concurrent.futures
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..core.fingerprint import DIGEST_BYTES, FILE_KEY, PIXEL_KEY
from ..errors import DataError, PneumoscanError
from .io import read_image_with_meta

log = logging.getLogger(__name__)

#: ``format`` of the stored record.
SEEN_FORMAT = "pneumoscan-seen-images/1"
#: The roles an image can have had, in the order a match reports them.
ROLES: tuple[str, ...] = ("train", "calibration")
#: How each role is named in warnings.
ROLE_WORDS = {"train": "training image", "calibration": "calibration image"}

__all__ = ["ROLES", "SEEN_FORMAT", "ImageDigest", "SeenImages", "digest_file", "digest_from_meta", "fingerprint_files", "seen_warning"]


@dataclass(frozen=True)
class ImageDigest:
    """The content digests of one image.

    Attributes:
        file: truncated sha256 of the file's bytes (``None`` when not known, e.g. an array).
        pixels: truncated sha256 of its full-resolution 8-bit greyscale pixels (``None`` when
            only a reduced decode was made).
    """

    file: bytes | None
    pixels: bytes | None


def digest_from_meta(meta: Mapping[str, Any] | None) -> ImageDigest | None:
    """The digests a reader put in an image's metadata (``decode_image(..., digest=True)``),
    or ``None`` when it put none.

    Args:
        meta: the reader's metadata.
    """
    if not meta or FILE_KEY not in meta:
        return None

    def unhex(v: Any) -> bytes | None:
        try:
            b = bytes.fromhex(v) if isinstance(v, str) else None
        except ValueError:
            return None
        return b if b is not None and len(b) == DIGEST_BYTES else None

    return ImageDigest(unhex(meta.get(FILE_KEY)), unhex(meta.get(PIXEL_KEY)))


def digest_file(path: str | Path) -> ImageDigest:
    """Read and fully decode one image file and digest it.

    Args:
        path: the image.

    Raises:
        ImageReadError: the file cannot be read as an image.
    """
    _, meta = read_image_with_meta(path, digest=True)
    d = digest_from_meta(meta)
    return d if d is not None else ImageDigest(None, None)


def fingerprint_files(paths: Iterable[str | Path], workers: int | None = None) -> list[ImageDigest]:
    """The digests of image files, in order (decoded at full resolution in a few threads).

    Args:
        paths: the images.
        workers: threads (default: up to 4, the usable CPUs).

    Raises:
        DataError: a file that cannot be read (the images a model saw must all be recorded).
    """
    items = [str(p) for p in paths]
    n = workers or min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))

    def one(p: str) -> ImageDigest:
        try:
            return digest_file(p)
        except PneumoscanError as e:
            raise DataError(f"cannot fingerprint {p}: {e}") from e

    if n <= 1 or len(items) < 8:
        return [one(p) for p in items]
    with concurrent.futures.ThreadPoolExecutor(max_workers=n, thread_name_prefix="pneumoscan-digest") as ex:
        return list(ex.map(one, items))


def seen_warning(role: str) -> str:
    """The warning attached to an answer on an image the model saw.

    Args:
        role: ``"train"`` or ``"calibration"``.
    """
    what = ROLE_WORDS.get(role, f"{role} image")
    return f"this image was used to build this model ({what}): its result says nothing about the model's performance"


@dataclass
class SeenImages:
    """The digests of the images a model was trained (``"train"``) and calibrated
    (``"calibration"``: the validation images that fixed its temperature and threshold, or a
    site's images) on.

    Attributes:
        files: per role, the file digests.
        pixels: per role, the pixel digests.
    """

    files: dict[str, set[bytes]] = field(default_factory=dict)
    pixels: dict[str, set[bytes]] = field(default_factory=dict)

    def count(self, role: str) -> int:
        """Distinct images recorded under a role.

        Args:
            role: one of :data:`ROLES`.
        """
        return max(len(self.files.get(role, ())), len(self.pixels.get(role, ())))

    def __len__(self) -> int:
        return sum(self.count(r) for r in ROLES)

    def add(self, role: str, digests: Sequence[ImageDigest]) -> "SeenImages":
        """Record images under a role (in place; returns ``self``).

        Args:
            role: one of :data:`ROLES`.
            digests: their digests.

        Raises:
            ValueError: an unknown role.
        """
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} ({', '.join(ROLES)})")
        files, pixels = self.files.setdefault(role, set()), self.pixels.setdefault(role, set())
        for d in digests:
            if d.file is not None:
                files.add(d.file)
            if d.pixels is not None:
                pixels.add(d.pixels)
        return self

    def merged(self, other: "SeenImages | None") -> "SeenImages":
        """The union of two records (a new object)."""
        out = SeenImages({r: set(v) for r, v in self.files.items()}, {r: set(v) for r, v in self.pixels.items()})
        if other is not None:
            for r in ROLES:
                if r in other.files or r in other.pixels:
                    out.files.setdefault(r, set()).update(other.files.get(r, ()))
                    out.pixels.setdefault(r, set()).update(other.pixels.get(r, ()))
        return out

    def match(self, digest: ImageDigest | None) -> str | None:
        """The role of a seen image (``"train"`` first), or ``None`` when it was not seen.

        Args:
            digest: the input's digests.
        """
        if digest is None:
            return None
        for r in ROLES:
            if (digest.file is not None and digest.file in self.files.get(r, ())) or (
                    digest.pixels is not None and digest.pixels in self.pixels.get(r, ())):
                return r
        return None

    # ------------------------------------------------------------------ storage
    def to_dict(self) -> dict[str, Any]:
        """The stored form: built-in values only (digests sorted and base64-coded)."""
        roles = {}
        for r in ROLES:
            if r in self.files or r in self.pixels:
                roles[r] = {"n": self.count(r), "file": _pack(self.files.get(r, set())), "pixels": _pack(self.pixels.get(r, set()))}
        return {"format": SEEN_FORMAT, "digest_bytes": DIGEST_BYTES, "roles": roles}

    @classmethod
    def from_dict(cls, d: Any) -> "SeenImages | None":
        """Read :meth:`to_dict` output; ``None`` (with a debug log) when absent or unreadable, so
        that an older or foreign bundle simply carries no record.

        Args:
            d: the stored value (``provenance["seen_images"]``).
        """
        if d is None:
            return None
        try:
            if d.get("format") != SEEN_FORMAT or int(d.get("digest_bytes")) != DIGEST_BYTES:
                raise ValueError(f"format {d.get('format')!r}")
            out = cls()
            for r, v in dict(d["roles"]).items():
                if r not in ROLES:
                    continue
                out.files[r], out.pixels[r] = _unpack(v["file"]), _unpack(v["pixels"])
            return out
        except (AttributeError, KeyError, TypeError, ValueError, binascii.Error) as e:
            log.debug("ignoring an unreadable record of the model's training images (%s)", e)
            return None


def _pack(digests: set[bytes]) -> str:
    return base64.b64encode(b"".join(sorted(digests))).decode("ascii")


def _unpack(text: str) -> set[bytes]:
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    if len(raw) % DIGEST_BYTES:
        raise ValueError("digest list of a wrong length")
    return {raw[i : i + DIGEST_BYTES] for i in range(0, len(raw), DIGEST_BYTES)}
