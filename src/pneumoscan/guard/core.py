"""The not-a-chest-X-ray guard: decide, before answering, whether an input is a frontal
chest radiograph.

Two stages, both deterministic and cheap (a few milliseconds per image):

1. **Rules** on the reader's metadata and obvious properties: a DICOM modality other than a
   radiograph (CT, MR, US, ...), a DICOM body part other than the chest, a colour image,
   a blank image, an image too small or with an aspect ratio no chest film has. Size,
   aspect and contrast are those of the image's *content*, inside uniform borders
   (letterboxed and padded films are not refused for their padding).
2. A **small classifier** (a one-hidden-layer network, or a logistic regression) on
   :func:`pneumoscan.guard.features.image_features`, measured on the image's canonical form
   (uniform borders cropped, intensities stretched, polarity matched to the chest template),
   fitted by ``pneumoscan guard fit`` on chest X-rays, also transformed as other hospitals'
   films look, versus photographs, documents, screenshots, charts, noise, CT/MR slices...
   Its parameters ship as JSON in ``pneumoscan/assets/guard/guard.json`` (no pickle, no
   extra dependency at run time: the forward pass is a few lines of numpy).

Use::

    from pneumoscan.guard import check
    ok, reason, score = check(image, meta)     # image from read_image_with_meta
"""
from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..data.io import ImageSource, read_image_with_meta
from ..errors import ConfigError
from .canonical import WORK_SIDE, Prepared, prepare
from .features import image_features

log = logging.getLogger(__name__)

FORMAT = "pneumoscan-guard/1"
GUARD_DIR = "assets/guard"
GUARD_FILE = "guard.json"

#: DICOM modalities that can hold a chest radiograph (CR, DX; DR and RG appear in older
#: files; OT/SC "other"/secondary capture and an empty value are left to the classifier).
RADIOGRAPH_MODALITIES = {"", "CR", "DX", "DR", "RG", "OT", "SC", "PX"}
MODALITY_NAMES = {
    "CT": "computed tomography", "MR": "magnetic resonance", "US": "ultrasound", "NM": "nuclear medicine",
    "PT": "PET", "MG": "mammography", "XA": "angiography", "RF": "fluoroscopy", "OP": "ophthalmic photography",
    "XC": "external camera photography", "SM": "slide microscopy", "IO": "intra-oral radiography",
    "ES": "endoscopy", "OCT": "optical coherence tomography", "SEG": "segmentation", "RTDOSE": "radiotherapy dose",
}
#: Values of DICOM BodyPartExamined accepted as chest (anything else non-empty is refused).
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "TORSO", "WHOLEBODY", "BODY", "PORTABLE", "CXR", "TRUNK")

DEFAULT_RULES: dict[str, float] = {
    "min_side": 64,  # pixels of the original image, and of its content inside uniform borders
    "max_aspect": 3.0,  # width / height of the content
    "min_aspect": 0.4,
    "min_contrast": 0.04,  # 99th minus 1st intensity percentile of the content (8-bit images)
    "min_contrast_high_bits": 0.002,  # the same for images of more than 8 bits (131 of 65,536 levels)
    "max_colour_fraction": 0.05,  # share of clearly coloured pixels
}
#: The checks that can refuse an image (:attr:`GuardResult.rule`).
RULES = ("dicom_modality", "dicom_body_part", "too_small", "aspect", "blank", "colour", "classifier")
#: How every refusal of an image's content begins (DICOM header refusals say what the header says).
NOT_CHEST = "does not look like a frontal chest X-ray"


@dataclass
class GuardResult:
    """The guard's answer for one image.

    Unpacks as ``ok, reason, score = result``.

    Attributes:
        ok: True when the image is accepted as a frontal chest X-ray.
        reason: why it was refused (one line), ``None`` when accepted.
        score: the classifier's probability that the image is a chest X-ray (0 when a rule
            refused it before the classifier ran).
        rule: which check decided a refusal (``dicom_modality``, ``dicom_body_part``,
            ``too_small``, ``aspect``, ``blank``, ``colour``, ``classifier``) or ``None``.
        features: the feature values (only when requested).
    """

    ok: bool
    reason: str | None
    score: float
    rule: str | None = None
    features: dict[str, float] | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.ok, self.reason, self.score))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"ok", "reason", "score", "rule"}``."""
        return {"ok": self.ok, "reason": self.reason, "score": round(self.score, 4), "rule": self.rule}

    @classmethod
    def from_worker(cls, d: Any) -> "GuardResult | None":
        """The result :func:`check_in_worker` sent back, ``None`` when it is not one (the
        worker decoded hostile bytes: nothing it says is taken on trust)."""
        if not isinstance(d, dict) or set(d) != {"ok", "reason", "score", "rule"}:
            return None
        ok, reason, score, rule = d["ok"], d["reason"], d["score"], d["rule"]
        if not isinstance(ok, bool) or not isinstance(score, (int, float)) or isinstance(score, bool) or not 0.0 <= score <= 1.0:
            return None
        if ok != (reason is None) or ok != (rule is None) or not (reason is None or (isinstance(reason, str) and len(reason) <= 500)):
            return None
        if rule is not None and rule not in RULES:
            return None
        return cls(ok, reason, float(score), rule)


class Guard:
    """A fitted guard: rules plus a small classifier on image features.

    Args:
        params: the parameter dict (the content of ``guard.json``): ``features`` (names),
            ``mean``/``scale`` (standardisation), ``classifier`` (``"mlp"`` or
            ``"logistic"``), for an MLP ``hidden_weights`` (features × units) and
            ``hidden_bias`` (ReLU units), then ``coef``/``intercept`` of the output logit,
            optional ``clip_lo``/``clip_hi`` (each feature is clipped to the range it had in
            the fitting set before it is standardised: an image unlike anything fitted
            cannot push the network into extrapolation),
            ``threshold`` (on the probability of being a chest X-ray), ``template``
            (``16×16`` mean chest thumbnail) and optional ``rules`` overriding
            :data:`DEFAULT_RULES`.

    Raises:
        ConfigError: malformed parameters.
    """

    def __init__(self, params: dict[str, Any]) -> None:
        try:
            if params.get("format") != FORMAT:
                raise ValueError(f"format {params.get('format')!r}, expected {FORMAT!r}")
            self.names: list[str] = [str(n) for n in params["features"]]
            self.mean = np.asarray(params["mean"], dtype=np.float64)
            self.scale = np.asarray(params["scale"], dtype=np.float64)
            self.coef = np.asarray(params["coef"], dtype=np.float64)
            self.intercept = float(params["intercept"])
            self.threshold = float(params["threshold"])
            self.kind = str(params.get("classifier", "logistic"))
            lo, hi = params.get("clip_lo"), params.get("clip_hi")
            self.clip_lo = None if lo is None else np.asarray(lo, dtype=np.float64)
            self.clip_hi = None if hi is None else np.asarray(hi, dtype=np.float64)
            tpl = params.get("template")
            self.template = None if tpl is None else np.asarray(tpl, dtype=np.float64)
            n = len(self.names)
            if not (self.mean.shape == self.scale.shape == (n,)):
                raise ValueError("features, mean and scale must have the same length")
            if (self.clip_lo is None) != (self.clip_hi is None) or (
                self.clip_lo is not None and not (self.clip_lo.shape == self.clip_hi.shape == (n,))  # type: ignore[union-attr]
            ):
                raise ValueError("clip_lo and clip_hi must both be given, one value per feature")
            if self.kind == "mlp":
                self.hidden_w = np.asarray(params["hidden_weights"], dtype=np.float64)
                self.hidden_b = np.asarray(params["hidden_bias"], dtype=np.float64)
                if self.hidden_w.shape != (n, self.hidden_b.shape[0]) or self.coef.shape != self.hidden_b.shape:
                    raise ValueError("hidden_weights, hidden_bias and coef shapes do not fit the features")
                weights = [self.hidden_w, self.hidden_b, self.coef]
            elif self.kind == "logistic":
                if self.coef.shape != (n,):
                    raise ValueError("features and coef must have the same length")
                weights = [self.coef]
            else:
                raise ValueError(f"unknown classifier {self.kind!r}")
            if not all(np.all(np.isfinite(w)) for w in weights) or not 0.0 < self.threshold < 1.0:
                raise ValueError("non-finite weights or threshold outside (0, 1)")
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"invalid guard parameters ({e})") from e
        self.rules = {**DEFAULT_RULES, **{k: float(v) for k, v in (params.get("rules") or {}).items()}}
        self.params = params

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_file(cls, path: str | Path) -> "Guard":
        """Load guard parameters from a JSON file.

        Args:
            path: a ``guard.json`` written by ``pneumoscan guard fit``.

        Raises:
            ConfigError: missing or malformed file.
        """
        p = Path(path)
        try:
            params = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"guard parameters not found: {p}") from e
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read guard parameters {p} ({e})") from e
        if not isinstance(params, dict):
            raise ConfigError(f"{p}: guard parameters must be a JSON object")
        return cls(params)

    @classmethod
    def default(cls) -> "Guard":
        """The shipped guard (``pneumoscan/assets/guard/guard.json``), loaded once."""
        return _default_guard()

    @property
    def worker_check(self) -> Callable[[np.ndarray, dict[str, Any]], dict[str, Any]] | None:
        """:func:`check_in_worker` when this is the shipped guard (a decoding worker process
        can run it there, see :func:`pneumoscan.data.isolated.decode_isolated`), else ``None``."""
        # the shipped guard is loaded once it exists: a custom guard never loads it just to compare
        return check_in_worker if _default_guard.cache_info().currsize and self is _default_guard() else None

    # ------------------------------------------------------------------ decision
    def features(self, image: np.ndarray, meta: dict[str, Any] | None = None, prepared: Prepared | None = None) -> dict[str, float]:
        """The classifier's input features of one image (see :func:`image_features`)."""
        return image_features(image, meta, self.template, prepared)

    def score(self, image: np.ndarray, meta: dict[str, Any] | None = None) -> float:
        """Probability (per the classifier) that ``image`` is a frontal chest X-ray."""
        return self._score(self.features(image, meta))

    def _score(self, feats: dict[str, float]) -> float:
        v = np.array([feats.get(n, 0.0) for n in self.names], dtype=np.float64)
        if self.clip_lo is not None:  # no extrapolation beyond the fitted range of a feature
            v = np.clip(v, self.clip_lo, self.clip_hi)
        x = (v - self.mean) / self.scale
        if self.kind == "mlp":
            x = np.maximum(x @ self.hidden_w + self.hidden_b, 0.0)
        z = float(x @ self.coef + self.intercept)
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))

    def check(self, image: np.ndarray, meta: dict[str, Any] | None = None, *, with_features: bool = False) -> GuardResult:
        """Accept or refuse one decoded image.

        Args:
            image: 2-D float greyscale in [0, 1] (from :func:`pneumoscan.data.io.read_image`).
            meta: the reader's metadata (from ``read_image_with_meta``): DICOM modality and
                body part, colour statistics and original size make the decision better;
                without it only the pixels are judged.
            with_features: also return the feature values.

        Returns:
            A :class:`GuardResult` (unpacks as ``ok, reason, score``).
        """
        meta = meta or {}
        prepared = prepare(image) if image.ndim == 2 and image.size else None
        refusal = self.rules_check(image, meta, prepared)
        if refusal is not None:
            rule, reason = refusal
            return GuardResult(False, reason, 0.0, rule)
        feats = self.features(image, meta, prepared)
        s = self._score(feats)
        if s < self.threshold:
            reason = f"{NOT_CHEST} (guard score {s:.2f} < {self.threshold:.2f})"
            return GuardResult(False, reason, s, "classifier", feats if with_features else None)
        return GuardResult(True, None, s, None, feats if with_features else None)

    def check_source(self, source: ImageSource, *, name: str | None = None, max_side: int | None = WORK_SIDE) -> GuardResult:
        """Read an image (path, bytes or stream) and :meth:`check` it.

        Args:
            source: a path, bytes or a binary stream.
            name: the name used in error messages.
            max_side: decode at most this large (the guard works at ``WORK_SIDE`` pixels, as
                ``predict`` decodes for it).

        Raises:
            ImageReadError: the input cannot be read as an image.
        """
        img, meta = read_image_with_meta(source, max_side=max_side, name=name)
        return self.check(img, meta)

    def rules_check(self, image: np.ndarray, meta: dict[str, Any], prepared: Prepared | None = None) -> tuple[str, str] | None:
        """The rules alone: ``(rule, reason)`` of the first that refuses, or ``None``.

        Args:
            image: 2-D float greyscale in [0, 1].
            meta: the reader's metadata.
            prepared: :func:`pneumoscan.guard.features.prepare` of ``image``, if computed.
        """
        r = self.rules
        if str(meta.get("format", "")).upper() == "DICOM":
            modality = str(meta.get("modality", "") or "").strip().upper()
            if modality not in RADIOGRAPH_MODALITIES:
                what = MODALITY_NAMES.get(modality, "not a radiograph")
                return "dicom_modality", f"DICOM modality {modality} ({what}) is not a chest radiograph"
            part = str(meta.get("body_part", "") or "").strip().upper()
            if part and not any(c in part.replace(" ", "") for c in CHEST_BODY_PARTS):
                return "dicom_body_part", f"DICOM body part {part} is not the chest"
        if image.ndim != 2 or image.size == 0:
            return "blank", "not a 2-D image"
        w, h = meta.get("original_size") or (image.shape[1], image.shape[0])
        w, h = int(w), int(h)
        if min(w, h) < r["min_side"]:
            return "too_small", f"image too small to be a chest X-ray ({w}x{h} pixels)"
        if float(meta.get("colour_fraction", 0.0) or 0.0) > r["max_colour_fraction"]:
            share = 100.0 * float(meta["colour_fraction"])
            return "colour", f"{NOT_CHEST} (colour image: {share:.0f}% of its pixels are coloured; X-rays are greyscale)"
        p = prepared or prepare(image)
        y0, y1, x0, x1 = p.box
        cw, ch = round((x1 - x0) * w / p.image.shape[1]), round((y1 - y0) * h / p.image.shape[0])
        bordered = (cw, ch) != (w, h)
        inside = f" inside uniform borders of a {w}x{h} image" if bordered else ""
        if min(cw, ch) < r["min_side"]:
            return "too_small", f"image too small to be a chest X-ray ({cw}x{ch} pixels{inside})"
        aspect = cw / max(ch, 1)
        if not r["min_aspect"] <= aspect <= r["max_aspect"]:
            return "aspect", f"aspect ratio {aspect:.2f}:1 ({cw}x{ch}{inside}) is not that of a chest X-ray"
        lo, hi = p.percentiles((1, 99))
        high_bits = int(meta.get("bits", 8) or 8) > 8
        if hi - lo < r["min_contrast_high_bits" if high_bits else "min_contrast"]:
            return "blank", f"{NOT_CHEST} (blank image: no contrast)"
        return None


@functools.lru_cache(maxsize=1)
def _default_guard() -> Guard:
    return Guard.from_file(default_guard_path())


def default_guard_path() -> Path:
    """Path of the shipped guard parameters inside the installed package."""
    return Path(str(resources.files("pneumoscan").joinpath(GUARD_DIR, GUARD_FILE)))


def check_in_worker(image: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    """The shipped guard's answer on an image a decoding worker process has just decoded, as
    JSON (the score unrounded: :meth:`GuardResult.from_worker` rebuilds the same result).

    Args:
        image: the decoded pixels.
        meta: the reader's metadata.
    """
    r = Guard.default().check(image, meta)
    return {"ok": r.ok, "reason": r.reason, "score": r.score, "rule": r.rule}


def decode_checked(source: ImageSource, guard: Guard | None, name: str | None = None,
                   **decode: Any) -> tuple[np.ndarray, dict[str, Any], GuardResult | None]:
    """:func:`~pneumoscan.data.isolated.decode_isolated`, with the shipped guard's check run by
    the decoding worker too (in parallel processes, not in the caller's threads, which share one
    interpreter lock with the model's).

    Args:
        source: a path, bytes or a binary stream.
        guard: the guard the caller applies, or ``None``.
        name: the name used in error messages.
        **decode: the other arguments of ``decode_isolated`` (``max_side``, ``timeout_s``, ...).

    Returns:
        The pixels, the metadata and the guard's result; the result is ``None`` when there is no
        guard, when it is not the shipped one, or when the worker's answer was unusable: the
        caller checks the image itself then.

    Raises:
        ImageReadError: as ``decode_isolated``.
    """
    from ..data.isolated import decode_isolated  # here: the workers import this module, not the pool

    remote = guard.worker_check if guard is not None else None
    arr, meta = decode_isolated(source, name, after=remote, **decode)
    return arr, meta, GuardResult.from_worker(meta.pop("after", None)) if remote is not None else None


def check(image: np.ndarray, meta: dict[str, Any] | None = None) -> GuardResult:
    """Run the shipped guard on one decoded image.

    Args:
        image: 2-D float greyscale in [0, 1].
        meta: metadata from :func:`pneumoscan.data.io.read_image_with_meta` (recommended).

    Returns:
        A :class:`GuardResult`; ``ok, reason, score = check(image, meta)``.
    """
    return Guard.default().check(image, meta)
