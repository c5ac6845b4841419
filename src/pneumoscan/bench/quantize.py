"""int8 quantisation of a checkpoint's ONNX model (ONNX Runtime static QDQ quantisation,
per-channel int8 weights, uint8 activations calibrated on training images), accepted only
when the validation ROC-AUC moves by at most ``max_auc_drop`` against the fp32 PyTorch model.

Recipe (chosen on the shipped MobileNetV2's validation split, see docs/benchmarks.md): every
convolution in int8 except the first and the last, the classifier in fp32, and an affine
correction ``a * logit + b`` appended to the graph, fitted on the calibration (training)
images so that the int8 logits match the fp32 ones; without it quantisation shifts the logits
by about +1 and 3-4 % of validation images change label at the stored threshold.

The int8 file keeps the source ONNX file's metadata (preprocessing, threshold, temperature,
model name) and adds the quantisation settings and the measured AUCs, so any ONNX consumer
of pneumoscan models can load it in place of the fp32 export.
"""
from __future__ import annotations

import json
import logging
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..data.datasets import Sample, load_samples, read_manifest
from ..data.io import read_image
from ..data.transforms import preprocess_batch
from ..errors import ConfigError, DataError, ModelError, PneumoscanError
from ..utils.io import atomic_path

log = logging.getLogger(__name__)

#: Largest validation-AUC change accepted for an int8 model (issue 6).
MAX_AUC_DROP = 0.002


# --------------------------------------------------------------------------- export
def export_fp32_onnx(ckpt: dict[str, Any], path: str | Path) -> Path:
    """Export a checkpoint to ONNX with the project's exporter (``pneumoscan export``:
    input ``image`` ``(B, 1, S, S)``, output ``logit``, calibration in the metadata).

    Args:
        ckpt: a loaded checkpoint dict.
        path: destination ``.onnx`` file.
    """
    from ..inference.onnx_export import export_onnx

    return Path(export_onnx(ckpt, path))


def _set_metadata(proto: Any, props: dict[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for k, v in props.items():
        if k in existing:
            existing[k].value = v
        else:
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v


# --------------------------------------------------------------------------- data
def preprocess_files(samples: Sequence[Sample], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode and preprocess images exactly as the Predictor does.

    Returns:
        ``(x, labels)``: float32 ``(N, 1, S, S)`` in [0, 1] and int64 labels.
    """
    arrs = []
    for s in samples:
        arrs.append(preprocess_batch([read_image(s.path, max_side=size)], size)[0].numpy())
    if not arrs:
        raise DataError("no images to preprocess")
    return np.stack(arrs).astype(np.float32), np.asarray([s.label for s in samples], dtype=np.int64)


class _Reader:
    """ONNX Runtime calibration reader over preprocessed batches."""

    def __init__(self, x: np.ndarray, input_name: str, batch: int = 16) -> None:
        batch = max(1, min(batch, len(x)))
        n = len(x) - len(x) % batch  # equal batches: the histogram calibrators stack them
        self._it: Iterator[dict[str, np.ndarray]] = iter(
            [{input_name: x[i : i + batch]} for i in range(0, n, batch)]
        )

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
                lf, lq = logits_onnx(src, calibration), logits_onnx(out, calibration)
                if np.std(lq) > 1e-6:
                    a, b = (float(v) for v in np.polyfit(lq.astype(np.float64), lf.astype(np.float64), 1))
                if not a > 0:  # a monotone correction only; keep ranking (AUC) intact
                    a, b = 1.0, float(np.mean(lf - lq))
                _append_affine(proto, a, b)
            _set_metadata(proto, {p.key: p.value for p in src_proto.metadata_props})
            _set_metadata(proto, {
                "pneumoscan.quantization": json.dumps({
                    "scheme": "onnxruntime static QDQ", "weights": "int8 per-channel", "activations": "uint8",
                    "calibration": method, "calibration_images": int(len(calibration)), "fp32_nodes": exclude,
                    "logit_correction": {"a": a, "b": b},
                }),
            })
            onnx.save(proto, str(out))
    return dst


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
def logits_torch(ckpt: dict[str, Any], x: np.ndarray, batch: int = 32, bf16: bool = False) -> np.ndarray:
    """PyTorch logits of preprocessed images: fp32 eager (the reference) or bf16 autocast
    with channels_last (the ``torch-bf16`` fast path)."""
    from ..training.checkpoint import model_from_checkpoint

    model = model_from_checkpoint(ckpt)
    if bf16:
        from .accel import Bf16ChannelsLast

        model = Bf16ChannelsLast(model)
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[i : i + batch])).float().view(-1).numpy())
    return np.concatenate(out)


def logits_onnx(path: str | Path, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """ONNX Runtime logits of preprocessed images."""
    from .accel import ort_session

    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    out = [np.asarray(sess.run(None, {name: x[i : i + batch]})[0], dtype=np.float32).reshape(-1) for i in range(0, len(x), batch)]
    return np.concatenate(out)


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from ..training.engine import roc_auc

    return roc_auc(labels, scores)


def _splits_beside(ckpt: dict[str, Any]) -> tuple[Path | None, Path | None]:
    p = Path(ckpt.get("_path", ""))
    d = p.parent if p.name else None
    if d is None:
        return None, None
    tr, va = d / "split_train.csv", d / "split_val.csv"
    return (tr if tr.is_file() else None), (va if va.is_file() else None)


def _load(src: str | Path | None, what: str) -> list[Sample]:
    if src is None:
        raise DataError(f"no {what} images: pass a manifest/folder (a run directory's split_{what}.csv is used when present)")
    p = Path(src)
    if p.suffix.lower() == ".csv":
        return read_manifest(p)
    return load_samples(p, "val" if what == "val" else "train")


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
    """Export, quantise to int8 and accept the result only if validation AUC holds.

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
        ``max_abs_prob_diff``, ``label_agreement``, ``n_val``, ``accepted`` and paths.

    Raises:
        ModelError: the int8 model changes validation AUC by more than ``max_auc_drop``
            (nothing is written to ``out``).
    """
    from ..core.calibration import sigmoid
    from ..training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    size = int(ckpt["preprocessing"]["input_size"])
    tr_default, va_default = _splits_beside(ckpt)
    calib_s = _load(calib or tr_default, "train")
    val_s = _load(val or va_default, "val")
    val_paths = {Path(s.path).resolve() for s in val_s}
    calib_s = [s for s in calib_s if Path(s.path).resolve() not in val_paths]
    rng = random.Random(seed)
    calib_s = rng.sample(calib_s, min(calib_images, len(calib_s)))
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
        export_fp32_onnx(ckpt, fp32)
        int8_tmp = Path(tmp) / "int8.onnx"
        quantize_int8(fp32, int8_tmp, xc, method=method)
        lt = logits_torch(ckpt, xv)
        lb = logits_torch(ckpt, xv, bf16=True)
        lo = logits_onnx(fp32, xv)
        lq = logits_onnx(int8_tmp, xv)
        T = float(ckpt.get("temperature", 1.0))
        thr = float(ckpt.get("threshold", 0.5))
        pt, pq, pb = sigmoid(lt / T), sigmoid(lq / T), sigmoid(lb / T)
        res = {
            "checkpoint": str(ckpt.get("_path")), "n_val": int(len(yv)), "n_calibration": int(len(xc)), "method": method,
            "auc_fp32_torch": _auc(yv, lt), "auc_fp32_onnx": _auc(yv, lo), "auc_int8": _auc(yv, lq),
            "max_abs_prob_diff": float(np.max(np.abs(pq - pt))), "mean_abs_prob_diff": float(np.mean(np.abs(pq - pt))),
            "label_agreement": float(np.mean((pq >= thr) == (pt >= thr))),
            "fp32_onnx_max_abs_logit_diff": float(np.max(np.abs(lo - lt))), "max_auc_drop": max_auc_drop,
            "auc_bf16_torch": _auc(yv, lb), "bf16_mean_abs_prob_diff": float(np.mean(np.abs(pb - pt))),
            "bf16_max_abs_prob_diff": float(np.max(np.abs(pb - pt))), "bf16_label_agreement": float(np.mean((pb >= thr) == (pt >= thr))),
            "int8_bytes": int_size(int8_tmp), "fp32_bytes": int_size(fp32),
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


def int_size(path: str | Path) -> int:
    """File size in bytes."""
    return Path(path).stat().st_size


__all__ = [
    "MAX_AUC_DROP", "export_fp32_onnx", "quantize_int8", "quantize_checkpoint", "preprocess_files",
    "logits_torch", "logits_onnx", "PneumoscanError",
]
