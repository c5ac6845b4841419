"""Exception hierarchy. Every error pneumoscan raises on bad input derives from
:class:`PneumoscanError`, so the CLI and the service can turn it into one clear line."""
from __future__ import annotations


class PneumoscanError(Exception):
    """Base class of all errors pneumoscan raises deliberately."""


class ConfigError(PneumoscanError):
    """A configuration value or file is invalid."""


class DataError(PneumoscanError):
    """A dataset folder or manifest is missing or malformed."""


class ImageReadError(PneumoscanError):
    """An image file could not be read or decoded.

    Args:
        source: the file name (or a description of in-memory bytes).
        reason: a short human-readable reason.
    """

    def __init__(self, source: str, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


class UnsupportedFormatError(ImageReadError):
    """The file is not an image format pneumoscan reads (JPEG, PNG, DICOM, ...)."""


class ImageTooLargeError(ImageReadError):
    """The image declares more pixels than allowed (decompression-bomb guard)."""


class ModelError(PneumoscanError):
    """Unknown model name or bad model arguments."""


class WeightsError(PneumoscanError):
    """Pretrained weights are missing, corrupt or fail checksum verification."""


class CheckpointError(PneumoscanError):
    """A checkpoint is missing, malformed or unsafe to load."""
