"""Is an image like the ones this model was validated on? A distribution-shift score from the
model's own features (NumPy only at prediction time).

The features are the global-average-pooled output of the model's last feature maps (its
Grad-CAM layer): for a pooled linear head (MobileNetV2, ResNets, EfficientNet) exactly the
input of the linear unit. A :class:`ShiftDetector` is a probabilistic-PCA Gaussian of those
features, fitted on the training images of the model's run: its score is the Mahalanobis
distance, i.e. the distance in the first principal components under a Ledoit-Wolf shrinkage
covariance plus the residual outside them scaled by the mean residual variance (Tipping &
Bishop 1999). The residual is what catches inverted, blurred or rotated films, whose features
move off the directions chest films vary along. An image is flagged when its score exceeds a
threshold: the 99th percentile of the training images' scores, raised to the 95th percentile of
the validation images' when more than 5 % of those would be flagged, so that at most 5 % of the
model's own validation images are flagged (the measured rates are kept in ``stats``).

A flagged image still gets its answer, with a warning saying that it lies outside the validated
population (:meth:`ShiftDetector.warning`). Where the detector comes from: the bundle's
``provenance["shift"]`` (:meth:`ShiftDetector.to_dict`), else, for the shipped default model,
the sidecar ``assets/default/shift.npz`` named by its manifest (``shift_file``) and verified
against ``shift_sha256``. That sidecar also holds the default model's validation logits
(``val_logits``/``val_labels``), which its ONNX export does not carry (:func:`validation_logits`).

Features come from the runner (:func:`~pneumoscan.inference.features.feature_forward`): a
forward hook on the layer of the PyTorch model, or the ``features`` output of an ONNX export
(pooled over H, W). A runner without feature maps (an ONNX file without ``features``, int8
files, ensembles) gives no score: the answers then carry no ``shift_score`` (logged once, at
INFO).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ..errors import CheckpointError, DataError, ModelError
from .features import FeatureForward, feature_forward
from .runners import Runner

if TYPE_CHECKING:
    from ..models.bundle import ModelBundle

log = logging.getLogger(__name__)

#: ``format`` of :meth:`ShiftDetector.to_dict`.
SHIFT_FORMAT = "pneumoscan-shift/1"
#: Principal components kept by default.
DEFAULT_COMPONENTS = 64
#: Largest share of the model's own validation images that may be flagged.
MAX_FLAG_RATE = 0.05
#: Percentile of the training images' distances tried first as the threshold.
TRAIN_PERCENTILE = 99.0
#: The shipped default model's manifest keys of its sidecar.
SIDECAR_KEYS = ("shift_file", "shift_sha256")
_ARRAYS = ("mean", "components", "precision")


# ----------------------------------------------------------------------------- the detector
@dataclass
class ShiftDetector:
    """Mahalanobis distance of pooled features in a principal subspace, and its threshold.

    Attributes:
        layer: the feature layer (``named_modules`` name) whose pooled output is scored.
        mean: ``(C,)`` mean feature of the training images.
        components: ``(k, C)`` orthonormal principal directions.
        precision: ``(k, k)`` inverse of the shrunk covariance of the projections.
        residual_variance: mean variance per dimension outside the subspace (0: no residual term).
        threshold: an image whose score exceeds it is flagged.
        population: what the model was validated on, in words (shown in warnings).
        stats: how it was fitted: ``n_train``, ``n_val``, ``components``, ``shrinkage``,
            ``rule`` (``train-p99`` or ``val-p95``), ``train_flag_rate``, ``val_flag_rate``,
            ``fitted_on``.
    """

    layer: str
    mean: np.ndarray
    components: np.ndarray
    precision: np.ndarray
    residual_variance: float
    threshold: float
    population: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        """Width ``C`` of the pooled features."""
        return int(self.mean.size)

    def score(self, features: np.ndarray) -> np.ndarray:
        """Shift scores ``(B,)`` (Mahalanobis distances under the fitted Gaussian) of pooled
        features ``(B, C)``.

        Raises:
            ModelError: features of another width than the detector's.
        """
        x = np.asarray(features, dtype=np.float64)
        x = x.reshape(x.shape[0], -1) if x.ndim else x.reshape(1, -1)
        if x.shape[1] != self.n_features:
            raise ModelError(f"shift detector expects {self.n_features} features of {self.layer}, got {x.shape[1]}")
        xc = x - self.mean
        z = xc @ self.components.T
        d2 = np.einsum("ij,jk,ik->i", z, self.precision, z)
        if self.residual_variance > 0:
            d2 = d2 + np.sum((xc - z @ self.components) ** 2, axis=1) / self.residual_variance
        return np.sqrt(np.maximum(d2, 0.0))

    def warning(self, score: float) -> str | None:
        """The warning of an image with this score, or ``None`` when it is not flagged."""
        if not score > self.threshold:
            return None
        where = f": the model was validated on {self.population}" if self.population else ""
        return (f"unlike the images this model was validated on (shift score {score:.1f} > {self.threshold:.1f}){where}; "
                "treat this answer with caution")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (lists of float32 values): ``provenance["shift"]``."""
        return {"format": SHIFT_FORMAT, "layer": self.layer, "threshold": float(self.threshold), "population": self.population,
                "residual_variance": float(self.residual_variance), "stats": dict(self.stats),
                **{k: np.asarray(getattr(self, k), np.float32).tolist() for k in _ARRAYS}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "shift detector") -> "ShiftDetector":
        """Rebuild from :meth:`to_dict` output (or the arrays of a sidecar file).

        Raises:
            CheckpointError: missing, mis-shaped or non-finite values.
        """
        try:
            arrays = {k: np.asarray(d[k], dtype=np.float64) for k in _ARRAYS}
            det = cls(str(d["layer"]), arrays["mean"].reshape(-1), arrays["components"], arrays["precision"],
                      float(d.get("residual_variance") or 0.0), float(d["threshold"]), str(d.get("population") or ""),
                      dict(d.get("stats") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: malformed shift detector ({e})") from e
        c, k = det.n_features, det.components.shape[0] if det.components.ndim == 2 else -1
        ok = (det.layer and c > 0 and k > 0 and det.components.shape == (k, c) and det.precision.shape == (k, k)
              and all(np.all(np.isfinite(a)) for a in (det.mean, det.components, det.precision)) and np.isfinite(det.threshold)
              and np.isfinite(det.residual_variance) and det.residual_variance >= 0)
        if not ok:
            raise CheckpointError(f"{source}: malformed shift detector (shapes or values do not fit)")
        return det

    def to_npz(self, extra: Mapping[str, np.ndarray] | None = None) -> bytes:
        """The detector as ``.npz`` bytes (no pickles), plus ``extra`` arrays."""
        meta = {k: v for k, v in self.to_dict().items() if k not in _ARRAYS}
        buf = io.BytesIO()
        np.savez(buf, meta=np.asarray(json.dumps(meta)), **{k: np.asarray(getattr(self, k), np.float32) for k in _ARRAYS},
                 **{k: np.asarray(v) for k, v in (extra or {}).items()})
        return buf.getvalue()


def read_npz(data: bytes, source: str) -> tuple[ShiftDetector, dict[str, np.ndarray]]:
    """A detector and the other arrays of :meth:`ShiftDetector.to_npz` bytes.

    Raises:
        CheckpointError: not such a file.
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: not a pneumoscan shift file ({e})") from e
    det = ShiftDetector.from_dict({**meta, **{k: arrays.pop(k, None) for k in _ARRAYS}}, source)
    return det, arrays


# ----------------------------------------------------------------------------- fitting
def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf shrinkage covariance of centred rows (Ledoit & Wolf 2004, as scikit-learn).

    Args:
        x: ``(n, p)`` centred samples.

    Returns:
        The covariance ``(1 - a) S + a mu I`` and the shrinkage ``a`` in [0, 1].
    """
    n, p = x.shape
    emp = x.T @ x / n
    mu = float(np.trace(emp)) / p
    x2 = x ** 2
    delta = float(np.sum(emp ** 2)) - 2 * mu * float(np.trace(emp)) + p * mu * mu
    beta = (float(np.sum(x2.T @ x2)) / n - float(np.sum(emp ** 2))) / n
    shrink = 0.0 if delta <= 0 else min(max(beta / delta, 0.0), 1.0)
    return (1 - shrink) * emp + shrink * mu * np.eye(p), shrink


def fit_shift_detector(
    train: np.ndarray, val: np.ndarray, *, layer: str, population: str = "", fitted_on: str = "",
    n_components: int = DEFAULT_COMPONENTS, max_flag_rate: float = MAX_FLAG_RATE,
) -> ShiftDetector:
    """Fit a detector on the pooled features of training images and set its threshold on
    validation images (see the module docstring).

    Args:
        train: ``(n, C)`` features of the training images (the mean, subspace, covariance and
            residual variance).
        val: ``(m, C)`` features of validation images (the threshold and its measured rate).
        layer: the feature layer.
        population: what the model was validated on, in words.
        fitted_on: where the images came from (kept in ``stats``).
        n_components: principal components kept (at most ``(n - 1) / 2`` and ``C - 1``, so that
            the training images leave a residual to measure).
        max_flag_rate: largest share of the validation images flagged.

    Raises:
        DataError: fewer than 3 training images, no validation image, or constant features.
    """
    x, v = np.asarray(train, np.float64), np.asarray(val, np.float64)
    if x.ndim != 2 or x.shape[0] < 3 or x.shape[1] < 2 or v.ndim != 2 or v.shape[0] < 1 or v.shape[1] != x.shape[1]:
        raise DataError("a shift detector needs the features of at least 3 training and 1 validation image")
    n, c = x.shape
    mean = x.mean(axis=0).astype(np.float32).astype(np.float64)  # stored as float32: fit with the stored values
    xc = x - mean
    k = max(1, min(int(n_components), (n - 1) // 2, c - 1))
    comps = np.linalg.svd(xc, full_matrices=False)[2][:k].astype(np.float32).astype(np.float64)
    z = xc @ comps.T
    cov, shrink = ledoit_wolf(z)
    if not np.trace(cov) > 0:
        raise DataError("the training images' features are constant: no shift detector can be fitted")
    resid = float(np.mean(np.sum((xc - z @ comps) ** 2, axis=1))) / (c - k)
    resid = resid if resid > 1e-12 * float(np.trace(cov)) / k else 0.0
    det = ShiftDetector(layer, mean, comps, np.linalg.inv(cov).astype(np.float32).astype(np.float64), resid, np.inf, population)
    s_train, s_val = det.score(x), det.score(v)
    det.threshold, rule = float(np.percentile(s_train, TRAIN_PERCENTILE)), f"train-p{TRAIN_PERCENTILE:g}"
    if np.mean(s_val > det.threshold) > max_flag_rate:
        det.threshold = float(np.quantile(s_val, 1.0 - max_flag_rate, method="higher"))
        rule = f"val-p{100 * (1 - max_flag_rate):g}"
    det.stats = {
        "n_train": n, "n_val": int(v.shape[0]), "components": k, "shrinkage": round(shrink, 6), "rule": rule,
        "train_flag_rate": float(np.mean(s_train > det.threshold)), "val_flag_rate": float(np.mean(s_val > det.threshold)),
        "val_score_median": float(np.median(s_val)), "fitted_on": fitted_on,
    }
    log.info("shift detector on %s: %d components, shrinkage %.3f, threshold %.2f (%s): %.1f %% of %d training and %.1f %% of %d "
             "validation images flagged", layer, k, shrink, det.threshold, rule, 100 * det.stats["train_flag_rate"], n,
             100 * det.stats["val_flag_rate"], v.shape[0])
    return det


# ----------------------------------------------------------------------------- at prediction time
@dataclass
class ShiftMonitor:
    """A predictor's detector and the runner call that gives its features.

    Attributes:
        detector: the fitted detector.
        forward: logits and pooled features of a batch (:func:`feature_forward`).
    """

    detector: ShiftDetector
    forward: FeatureForward

    @classmethod
    def for_predictor(cls, bundle: ModelBundle, runner: Runner) -> "ShiftMonitor | None":
        """The monitor of a model on a runner; ``None`` when the model has no detector, or (said
        once at INFO) when the runner cannot give its features.

        Raises:
            CheckpointError: a malformed detector, or the default model's sidecar fails its checksum.
        """
        det = shift_detector(bundle)
        if det is None:
            return None
        forward = feature_forward(runner, det.layer)
        if forward is None:
            log.info("no distribution-shift score on the %s backend (its model gives no feature maps of %s)",
                     getattr(runner, "backend", "?"), det.layer)
            return None
        return cls(det, forward)


def shift_detector(bundle: ModelBundle) -> ShiftDetector | None:
    """A bundle's detector: ``provenance["shift"]``, else the shipped default model's sidecar
    when ``bundle`` is the default model; ``None`` when it has none.

    Raises:
        CheckpointError: malformed detector, or the sidecar fails its checksum.
    """
    stored = bundle.provenance.get("shift")
    if stored:
        return ShiftDetector.from_dict(stored, f"{bundle.name}: provenance['shift']")
    side = _default_sidecar(bundle)
    return side[0] if side is not None else None


def validation_logits(bundle: ModelBundle) -> tuple[np.ndarray, np.ndarray] | None:
    """The validation logits and labels of a model (``provenance["val_logits"]``/``["val_labels"]``,
    else the shipped default model's sidecar), or ``None`` when unknown.

    Raises:
        CheckpointError: the default model's sidecar fails its checksum.
    """
    z, y = bundle.provenance.get("val_logits"), bundle.provenance.get("val_labels")
    if not z:
        side = _default_sidecar(bundle)
        z, y = (side[1].get("val_logits"), side[1].get("val_labels")) if side is not None else (None, None)
    if z is None or y is None or len(z) == 0 or len(z) != len(y):
        return None
    return np.asarray(z, np.float64).reshape(-1), np.asarray(y, np.int64).reshape(-1)


_sidecar_cache: dict[str, tuple[ShiftDetector, dict[str, np.ndarray]]] = {}


def _default_sidecar(bundle: ModelBundle) -> tuple[ShiftDetector, dict[str, np.ndarray]] | None:
    """The default model's sidecar (detector, other arrays) when ``bundle`` is that model and its
    manifest lists one; read and verified once per process."""
    from ..models.bundle import default_manifest, default_model_dir

    if not bundle.sha256:
        return None
    try:
        man = default_manifest()
    except CheckpointError:  # no default model installed
        return None
    if man.get("sha256") != bundle.sha256 or not man.get(SIDECAR_KEYS[0]):
        return None
    path = default_model_dir() / str(man[SIDECAR_KEYS[0]])
    key = f"{path}:{man.get(SIDECAR_KEYS[1])}"
    if key not in _sidecar_cache:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CheckpointError(f"default model file missing or unreadable: {path} ({e.strerror or e})") from e
        digest = hashlib.sha256(data).hexdigest()
        if digest != man.get(SIDECAR_KEYS[1]):
            raise CheckpointError(f"default model {path.name} failed its checksum (sha256 {digest[:12]}…, "
                                  f"expected {str(man.get(SIDECAR_KEYS[1]))[:12]}…)")
        _sidecar_cache[key] = read_npz(data, path.name)
    return _sidecar_cache[key]


def replace_detector(bundle: ModelBundle, detector: ShiftDetector | None) -> ModelBundle:
    """A copy of ``bundle`` whose ``provenance["shift"]`` is ``detector`` (removed when ``None``);
    like :meth:`~pneumoscan.models.bundle.ModelBundle.replace`, the copy has no file yet.

    Args:
        bundle: the model; not modified.
        detector: the new detector.
    """
    prov = {k: v for k, v in bundle.provenance.items() if k != "shift"}
    if detector is not None:
        prov["shift"] = detector.to_dict()
    return bundle.replace(provenance=prov)
