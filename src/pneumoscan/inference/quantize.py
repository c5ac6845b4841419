"""int8 quantisation of a model's ONNX export (the ``onnx-int8`` backend): ONNX Runtime static
QDQ quantisation, per-channel int8 weights, uint8 activations calibrated on training images,
accepted only when the validation ROC-AUC moves by at most ``max_auc_drop`` against the fp32
PyTorch model (``pneumoscan benchmark quantize``).

Recipe (chosen on the shipped MobileNetV2's validation split, see docs/benchmarks.md): every
convolution in int8 except the first and the last, the classifier in fp32, and an affine
correction ``a * logit + b`` appended to the graph, fitted on the calibration (training)
images so that the int8 logits match the fp32 ones; without it quantisation shifts the logits
by about +1 and 3-4 % of validation images change label at the stored threshold.

The int8 file keeps the export's metadata (the model description: preprocessing, threshold,
temperature, name) and adds the quantisation settings, so ``pneumoscan predict --onnx
model.int8.onnx`` (or ``load_predictor(onnx=..., backend="onnx-int8")``) loads it like the fp32
export.
"""
from __future__ import annotations

import json
import logging
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from ..core.calibration import sigmoid
from ..core.metrics import roc_auc
from ..data.io import read_image
from ..data.preprocessing import preprocess_arrays
from ..errors import ConfigError, DataError, ModelError
from ..models.bundle import load_bundle
from ..utils.io import atomic_path
from .onnx_export import export_onnx
from .runners import QUANTIZATION_KEY, TorchRunner, cpu_session

if TYPE_CHECKING:
    from ..data.datasets import Sample

log = logging.getLogger(__name__)

#: Largest validation-AUC change accepted for an int8 model (issue 6).
MAX_AUC_DROP = 0.002


# --------------------------------------------------------------------------- data
def preprocess_files(samples: Sequence[Sample], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode and preprocess images as the Predictor does (NumPy/Pillow).

    Returns:
        ``(x, labels)``: float32 ``(N, 1, S, S)`` in [0, 1] and int64 labels.
    """
    if not samples:
        raise DataError("no images to preprocess")
    x = preprocess_arrays([read_image(s.path, max_side=size) for s in samples], size)
    return x, np.asarray([s.label for s in samples], dtype=np.int64)


class _Reader:
    """ONNX Runtime calibration reader over preprocessed batches."""

    def __init__(self, x: np.ndarray, input_name: str, batch: int = 16) -> None:
        batch = max(1, min(batch, len(x)))
        n = len(x) - len(x) % batch  # equal batches: the histogram calibrators stack them
        self._it: Iterator[dict[str, np.ndarray]] = iter([{input_name: x[i : i + batch]} for i in range(0, n, batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - used by some calibrators
        pass


# --------------------------------------------------------------------------- quantisation
def quantize_int8(
    src: str | Path, dst: str | Path, calibration: np.ndarray, *, method: str = "minmax", keep_fp32_ends: bool = True,
    correct_logits: bool = True,
) -> Path:
    """Static QDQ int8 quantisation of an fp32 ONNX model.

    Args:
        src: fp32 ONNX model.
        dst: destination (written atomically).
        calibration: preprocessed calibration images ``(N, 1, S, S)`` (training images, never
            the validation images the accuracy check uses).
        method: activation-range calibration: ``minmax``, ``percentile`` or ``entropy``.
        keep_fp32_ends: keep the classifier (last Gemm/MatMul) and the first and last
            convolution in fp32.
        correct_logits: append ``a * logit + b`` fitted (least squares) on the calibration
            images so the int8 logits track the fp32 logits.

    Raises:
        ConfigError: onnx/onnxruntime missing, or unknown calibration method.
    """
    try:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise ConfigError("int8 quantisation needs onnx and onnxruntime: pip install 'pneumoscan[onnx]'") from e
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise ConfigError(f"unknown calibration method '{method}' (minmax, percentile, entropy)")
    src, dst = Path(src), Path(dst)
    src_proto = onnx.load(str(src))
    input_name = src_proto.graph.input[0].name
    exclude: list[str] = []
    if keep_fp32_ends:
        heads = [n.name for n in src_proto.graph.node if n.op_type in ("Gemm", "MatMul")]
        convs = [n.name for n in src_proto.graph.node if n.op_type == "Conv"]
        exclude = heads[-1:] + convs[:1] + convs[-1:]
    with tempfile.TemporaryDirectory(prefix="pneumoscan-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        extra: dict[str, Any] = {"ActivationSymmetric": False, "WeightSymmetric": True}
        if method == "percentile":
            extra["CalibPercentile"] = 99.999
        with atomic_path(dst) as out:
            quantize_static(
                str(pre), str(out), _Reader(calibration, input_name), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=methods[method],
                nodes_to_exclude=exclude, extra_options=extra,
            )
            proto = onnx.load(str(out))
            a, b = 1.0, 0.0
            if correct_logits:
                lf, lq = onnx_logits(src, calibration), onnx_logits(out, calibration)
                if np.std(lq) > 1e-6:
                    a, b = (float(v) for v in np.polyfit(lq.astype(np.float64), lf.astype(np.float64), 1))
                if not a > 0:  # a monotone correction only; keep ranking (AUC) intact
                    a, b = 1.0, float(np.mean(lf - lq))
                _append_affine(proto, a, b)
            _set_metadata(proto, {p.key: p.value for p in src_proto.metadata_props})
            _set_metadata(proto, {
                QUANTIZATION_KEY: json.dumps({
                    "scheme": "onnxruntime static QDQ", "weights": "int8 per-channel", "activations": "uint8",
                    "calibration": method, "calibration_images": int(len(calibration)), "fp32_nodes": exclude,
                    "logit_correction": {"a": a, "b": b},
                }),
            })
            onnx.save(proto, str(out))
    return dst


def _set_metadata(proto: Any, props: dict[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for k, v in props.items():
        if k in existing:
            existing[k].value = v
        else:
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v


def _append_affine(proto: Any, a: float, b: float) -> None:
    """Rewrite the graph's (single) output ``y`` as ``y * a + b`` (fp32 nodes)."""
    from onnx import TensorProto, helper

    out = proto.graph.output[0]
    raw = out.name + "_int8_raw"
    for node in proto.graph.node:
        node.output[:] = [raw if o == out.name else o for o in node.output]
        node.input[:] = [raw if i == out.name else i for i in node.input]
    proto.graph.initializer.extend([
        helper.make_tensor("pneumoscan_logit_scale", TensorProto.FLOAT, [], [a]),
        helper.make_tensor("pneumoscan_logit_shift", TensorProto.FLOAT, [], [b]),
    ])
    proto.graph.node.extend([
        helper.make_node("Mul", [raw, "pneumoscan_logit_scale"], [raw + "_scaled"], name="pneumoscan_logit_correction_mul"),
        helper.make_node("Add", [raw + "_scaled", "pneumoscan_logit_shift"], [out.name], name="pneumoscan_logit_correction_add"),
    ])


# --------------------------------------------------------------------------- accuracy gate
def onnx_logits(path: str | Path, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """ONNX Runtime logits of preprocessed images (any ONNX file, e.g. a quantiser intermediate)."""
    sess = cpu_session(path)
    name = sess.get_inputs()[0].name
    out = [np.asarray(sess.run(None, {name: x[i : i + batch]})[0], dtype=np.float32).reshape(-1) for i in range(0, len(x), batch)]
    return np.concatenate(out)


def _batched(forward: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([forward(x[i : i + batch]) for i in range(0, len(x), batch)])


def _samples(src: str | Path | None, what: str) -> list[Sample]:
    from ..data.datasets import load_samples, read_manifest

    if src is None:
        raise DataError(f"no {what} images: pass a manifest/folder (a run directory's split_{what}.csv is used when present)")
    p = Path(src)
    return read_manifest(p) if p.suffix.lower() == ".csv" else load_samples(p, "val" if what == "val" else "train")


def _beside(path: Path | None, name: str) -> Path | None:
    f = path.parent / name if path is not None else None
    return f if f is not None and f.is_file() else None


def quantize_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    calib: str | Path | None = None,
    val: str | Path | None = None,
    calib_images: int = 200,
    val_limit: int = 0,
    method: str = "minmax",
    max_auc_drop: float = MAX_AUC_DROP,
    fp32_out: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Export, quantise to int8 and accept the result only if validation AUC holds; also
    report how the ``torch-bf16`` backend agrees on the same images.

    Args:
        checkpoint: checkpoint file or run directory.
        out: the int8 ONNX file to write.
        calib: calibration images (folder or manifest); default the run's ``split_train.csv``.
        val: validation images; default the run's ``split_val.csv``.
        calib_images: how many training images calibrate the activation ranges.
        val_limit: use at most this many validation images (0 = all).
        method: calibration method (``minmax``, ``percentile``, ``entropy``).
        max_auc_drop: largest accepted ``|AUC_int8 - AUC_fp32|``.
        fp32_out: also keep the fp32 ONNX export here.
        seed: seed for choosing calibration images.

    Returns:
        dict with ``auc_fp32_torch``, ``auc_fp32_onnx``, ``auc_int8``, ``auc_change``,
        ``max_abs_prob_diff``, ``label_agreement``, ``n_val``, ``accepted``, the bf16
        figures and paths.

    Raises:
        ModelError: the int8 model changes validation AUC by more than ``max_auc_drop``
            (nothing is written to ``out``).
    """
    bundle = load_bundle(checkpoint)
    size = bundle.input_size
    calib_s = _samples(calib or _beside(bundle.path, "split_train.csv"), "train")
    val_s = _samples(val or _beside(bundle.path, "split_val.csv"), "val")
    val_paths = {Path(s.path).resolve() for s in val_s}
    calib_s = [s for s in calib_s if Path(s.path).resolve() not in val_paths]
    calib_s = random.Random(seed).sample(calib_s, min(calib_images, len(calib_s)))
    if val_limit and val_limit < len(val_s):
        val_s = sorted(random.Random(seed + 1).sample(val_s, val_limit), key=lambda s: s.path)
    labels = np.asarray([s.label for s in val_s])
    if labels.min() == labels.max():
        raise DataError("the validation images hold only one class; AUC is undefined")
    log.info("preprocessing %d calibration and %d validation images", len(calib_s), len(val_s))
    xc, _ = preprocess_files(calib_s, size)
    xv, yv = preprocess_files(val_s, size)

    with tempfile.TemporaryDirectory(prefix="pneumoscan-onnx-") as tmp:
        fp32 = Path(fp32_out) if fp32_out else Path(tmp) / "fp32.onnx"
        export_onnx(bundle, fp32, features=False)  # the logit only: the int8 graph keeps one output
        int8_tmp = Path(tmp) / "int8.onnx"
        quantize_int8(fp32, int8_tmp, xc, method=method)
        lt = _batched(TorchRunner(bundle.build_model(), channels_last=False).forward, xv)  # fp32 eager: the reference
        lb = _batched(TorchRunner(bundle.build_model(), bf16=True).forward, xv)
        lo, lq = onnx_logits(fp32, xv), onnx_logits(int8_tmp, xv)
        T, thr = bundle.temperature, bundle.threshold
        pt, pq, pb = sigmoid(lt / T), sigmoid(lq / T), sigmoid(lb / T)
        res = {
            "checkpoint": str(bundle.path), "n_val": int(len(yv)), "n_calibration": int(len(xc)), "method": method,
            "auc_fp32_torch": roc_auc(yv, lt), "auc_fp32_onnx": roc_auc(yv, lo), "auc_int8": roc_auc(yv, lq),
            "max_abs_prob_diff": float(np.max(np.abs(pq - pt))), "mean_abs_prob_diff": float(np.mean(np.abs(pq - pt))),
            "label_agreement": float(np.mean((pq >= thr) == (pt >= thr))),
            "fp32_onnx_max_abs_logit_diff": float(np.max(np.abs(lo - lt))), "max_auc_drop": max_auc_drop,
            "auc_bf16_torch": roc_auc(yv, lb), "bf16_mean_abs_prob_diff": float(np.mean(np.abs(pb - pt))),
            "bf16_max_abs_prob_diff": float(np.max(np.abs(pb - pt))), "bf16_label_agreement": float(np.mean((pb >= thr) == (pt >= thr))),
            "int8_bytes": int8_tmp.stat().st_size, "fp32_bytes": fp32.stat().st_size,
        }
        res["auc_change"] = res["auc_int8"] - res["auc_fp32_torch"]
        res["accepted"] = abs(res["auc_change"]) <= max_auc_drop
        if not res["accepted"]:
            raise ModelError(
                f"int8 model rejected: validation AUC {res['auc_int8']:.4f} vs fp32 {res['auc_fp32_torch']:.4f} "
                f"(change {res['auc_change']:+.4f}, allowed ±{max_auc_drop}); try --method entropy or more --calib-images"
            )
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as final:
            final.write_bytes(int8_tmp.read_bytes())
        res["out"] = str(out)
        if fp32_out:
            res["fp32_out"] = str(fp32_out)
    return res
