"""``pneumoscan benchmark {train,predict,serve,quantize,load,precision-parity}``.

Each speed benchmark prints the machine, the settings and a table of variants with images/s,
latency percentiles, data vs compute time, peak RSS and the ratio to a baseline measured in
the same run; ``--json FILE`` also writes the numbers. ``--smoke`` runs a tiny version that
only checks the machinery (CI); its figures mean nothing. ``load`` load-tests a
``pneumoscan serve`` on the loopback interface; ``precision-parity`` trains the same small
experiment in fp32 and bf16 and compares validation ROC-AUC.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from ..errors import ConfigError
from .serve import ENV_API_KEY

log = logging.getLogger(__name__)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise ConfigError("--threads must be >= 1")
        torch.set_num_threads(args.threads)


def _positive(args: argparse.Namespace, *names: str) -> None:
    for n in names:
        v = getattr(args, n)
        if v is not None and v < 1:
            raise ConfigError(f"--{n.replace('_', '-')} must be >= 1 (got {v})")


def _emit(report, args: argparse.Namespace) -> int:
    print(report.format(), flush=True)
    if args.json:
        report.write_json(args.json)
        log.info("results written to %s", args.json)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ..bench.train import engine_auto_variant, run_train_benchmark

    _positive(args, "images", "batch_size", "steps", "rounds")
    _threads(args)
    kw = dict(
        model=args.model, input_size=args.input_size, weights=args.weights, images=args.images, batch_size=args.batch_size,
        steps=args.steps, rounds=args.rounds, warmup=args.warmup, variants=_csv(args.variants), workers=args.workers,
        device=args.device, full_epoch=args.full_epoch,
    )
    if args.smoke:
        import torch

        from ..training.runtime import resolve_device

        kw.update(images=16, batch_size=4, steps=1, rounds=1, warmup=1, full_epoch=False,
                  variants=["fp32", engine_auto_variant(resolve_device(args.device))])
        torch.manual_seed(0)
    return _emit(run_train_benchmark(args.data, **kw), args)


def _cmd_predict(args: argparse.Namespace) -> int:
    from ..bench.predict import run_predict_benchmark

    _positive(args, "images", "latency_runs", "rounds", "batch_size")
    _threads(args)
    kw = dict(
        images=args.images, latency_image=args.latency_image, latency_runs=args.latency_runs, backends=_csv(args.backends),
        int8=args.int8, rounds=args.rounds, batch_size=args.batch_size, e2e=not args.no_e2e,
    )
    if args.smoke:
        kw.update(images=8, latency_runs=2, rounds=1, batch_size=4, smoke=True)
    return _emit(run_predict_benchmark(args.checkpoint, args.data, **kw), args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from ..bench.serve import run_serve_benchmark

    _positive(args, "requests", "concurrency")
    _threads(args)
    kw = dict(requests=args.requests, concurrency=args.concurrency, backends=_csv(args.backends), int8=args.int8,
              guard=not args.no_guard)
    if args.smoke:
        kw.update(requests=3, concurrency=2)
    return _emit(run_serve_benchmark(args.checkpoint, args.image, **kw), args)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from ..inference.quantize import quantize_checkpoint

    _positive(args, "calib_images")
    _threads(args)
    res = quantize_checkpoint(
        args.checkpoint, args.out, calib=args.calib, val=args.val, calib_images=args.calib_images, val_limit=args.val_limit,
        method=args.method, max_auc_drop=args.max_auc_drop, fp32_out=args.fp32_out,
    )
    print(
        f"int8 model {res['out']} accepted: validation AUC {res['auc_int8']:.4f} vs fp32 {res['auc_fp32_torch']:.4f} "
        f"(change {res['auc_change']:+.4f}, allowed ±{res['max_auc_drop']}) on {res['n_val']} images; "
        f"label agreement at the stored threshold {res['label_agreement']:.3f}, mean |Δp| {res['mean_abs_prob_diff']:.4f}, "
        f"max |Δp| {res['max_abs_prob_diff']:.3f}; {res['fp32_bytes'] / 1e6:.1f} MB -> {res['int8_bytes'] / 1e6:.1f} MB"
    )
    print(
        f"bf16 autocast (torch-bf16 backend) on the same images: AUC {res['auc_bf16_torch']:.4f} "
        f"(change {res['auc_bf16_torch'] - res['auc_fp32_torch']:+.4f}), label agreement {res['bf16_label_agreement']:.3f}, "
        f"mean |Δp| {res['bf16_mean_abs_prob_diff']:.4f}, max |Δp| {res['bf16_max_abs_prob_diff']:.3f}"
    )
    _write_json(res, args.json)
    return 0


def _write_json(obj: object, path: str | None) -> None:
    if path:
        from ..utils.io import atomic_write_text

        atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _cmd_load(args: argparse.Namespace) -> int:
    from ..bench.load import format_load_report, run_load_test

    api_key = args.api_key if args.api_key is not None else os.environ.get(ENV_API_KEY) or None
    res = run_load_test(
        url=args.url, server_pid=args.server_pid, checkpoint=args.checkpoint, api_key=api_key, image=args.image,
        levels=args.n, big=args.big, size_mb=args.size_mb, max_upload_mb=args.max_upload_mb, timeout=args.timeout,
        heatmap=args.heatmap, backend=args.backend,
    )
    print(format_load_report(res), flush=True)
    _write_json(res, args.json)
    return 0


def _cmd_precision_parity(args: argparse.Namespace) -> int:
    from ..bench.precision_parity import format_precision_parity, run_precision_parity

    _positive(args, "images", "epochs", "batch_size")
    seeds = [int(s) for s in _csv(args.seeds)]
    precisions = _csv(args.precisions)
    rows = run_precision_parity(args.data, args.images, args.epochs, seeds, precisions, args.model, args.batch_size)
    print(format_precision_parity(rows, args.model, args.images, args.epochs), flush=True)
    _write_json(rows, args.json)
    return 0


def _levels(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--n expects comma-separated integers, got {text!r}") from None


def _add_load(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "load", help="concurrent uploads (latency per concurrency level) or an upload storm against 'pneumoscan serve'",
        description="Load-test 'pneumoscan serve' on the loopback interface. Latency mode: for each concurrency level N "
                    "of --n, max(4N, 16) uploads with at most N in flight (throughput, p50/p95/p99). Storm mode (--big "
                    "100 --size-mb 20): that many concurrent uploads of a large JPEG while /healthz is probed and the "
                    "server's memory is sampled. Without --url a server is started on a free 127.0.0.1 port.",
    )
    d.add_argument("--url", help="running server on a loopback address (default: start one)")
    d.add_argument("--server-pid", type=int, help="pid of the server at --url, to report its memory")
    d.add_argument("--checkpoint", help="checkpoint for the server started here (default: shipped default model)")
    d.add_argument("--api-key", default=None, help=f"API key, if the server needs one (default: ${ENV_API_KEY} if set)")
    d.add_argument("--image", help="X-ray to upload (default: a bundled sample, NORMAL2-IM-1438-0001.jpeg)")
    d.add_argument("--n", type=_levels, default=[1, 8, 32], help="concurrency levels, e.g. 1,8,32 (each 1..256)")
    d.add_argument("--big", type=int, default=0, help="storm mode: this many concurrent large uploads (max 200)")
    d.add_argument("--size-mb", type=float, default=20.0, help="storm upload size in MB (max 45)")
    d.add_argument("--max-upload-mb", type=float, help="--max-upload-mb of the server started here")
    d.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds (also the server's deadline; max 600)")
    d.add_argument("--heatmap", action="store_true", help="ask for a Grad-CAM heatmap with every prediction")
    d.add_argument("--backend", choices=["torch", "onnx", "auto"], help="--backend of the server started here (default: serve's)")
    d.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    d.set_defaults(func=_cmd_load)


def _add_precision_parity(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "precision-parity", help="does bf16 autocast change what a model learns? fp32 vs bf16 validation AUC over seeds",
        description="Train the same small experiment in each precision for a few seeds (paired: a seed fixes the image "
                    "subset, the split, the initial weights and the shuffling) and compare validation ROC-AUC.",
    )
    e.add_argument("--data", required=True, help="dataset folder (its train split; patient-grouped validation carved from it)")
    e.add_argument("--images", type=int, default=600, help="training images per run (default 600)")
    e.add_argument("--epochs", type=int, default=3)
    e.add_argument("--seeds", default="0,1,2")
    e.add_argument("--precisions", default="fp32,bf16")
    e.add_argument("--model", default="seed_cnn")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    e.set_defaults(func=_cmd_precision_parity)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``pneumoscan benchmark`` and its actions.

    Args:
        subparsers: the CLI's sub-parser collection.
    """
    p = subparsers.add_parser(
        "benchmark", help="speed benchmarks (training, prediction, service) and int8 quantisation",
        description="Benchmarks that compare each variant with a baseline measured in the same run (interleaved "
                    "rounds), printing the machine (CPU, cores, torch, bf16 support, load average). On a shared "
                    "machine pin threads with --threads 1 (or OMP_NUM_THREADS=1) and read the ratios.",
    )
    sub = p.add_subparsers(dest="benchmark_command", metavar="ACTION")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--threads", type=int, help="torch/onnxruntime intra-op threads (default: torch's)")
        sp.add_argument("--json", metavar="FILE", help="also write the results as JSON")
        sp.add_argument("--smoke", action="store_true", help="tiny run that only checks the machinery (CI)")

    t = sub.add_parser("train", help="training images/s: fp32 eager vs channels_last vs bf16 autocast")
    t.add_argument("--data", required=True, help="dataset folder or manifest (its train split)")
    t.add_argument("--model", default="seed_cnn")
    t.add_argument("--input-size", type=int)
    t.add_argument("--weights", default="auto", help="auto (ImageNet where available), none, or a path")
    t.add_argument("--images", type=int, default=512, help="images cached and cycled through (default 512)")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--variants", default="fp32,fp32+cl,bf16,bf16+cl", help="comma list of fp32[+cl], bf16[+cl], fp16[+cl]")
    t.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    t.add_argument("--device", default="cpu")
    t.add_argument("--full-epoch", action="store_true", help="also train one real epoch over the whole train split")
    common(t)
    t.set_defaults(func=_cmd_train)

    q = sub.add_parser("predict", help="folder throughput and large-JPEG latency vs a hand-written loop")
    q.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    q.add_argument("--data", required=True, help="where the benchmark folder's images come from")
    q.add_argument("--images", type=int, default=624)
    q.add_argument("--latency-image", help="a large JPEG (e.g. 2,000 px) for single-image latency")
    q.add_argument("--latency-runs", type=int, default=30)
    q.add_argument("--backends", default="torch-fp32,torch-bf16,onnx-fp32,onnx-int8")
    q.add_argument("--int8", help="vetted int8 ONNX model (from 'benchmark quantize')")
    q.add_argument("--rounds", type=int, default=2)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--no-e2e", action="store_true", help="skip the whole-process timings")
    common(q)
    q.set_defaults(func=_cmd_predict)

    s = sub.add_parser("serve", help="POST /v1/predict latency per backend through a real uvicorn server")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--image", action="append", required=True, help="upload (repeatable)")
    s.add_argument("--requests", type=int, default=40)
    s.add_argument("--concurrency", type=int, default=4)
    s.add_argument("--backends", default="onnx-fp32,torch-fp32,torch-bf16,onnx-int8")
    s.add_argument("--int8", help="vetted int8 ONNX model")
    s.add_argument("--no-guard", action="store_true", help="skip the not-a-chest-X-ray guard")
    common(s)
    s.set_defaults(func=_cmd_serve)

    z = sub.add_parser("quantize", help="int8 ONNX model, accepted only if validation AUC changes <= 0.002")
    z.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    z.add_argument("--out", required=True, help="int8 .onnx file to write")
    z.add_argument("--calib", help="calibration images (folder or manifest; default: the run's split_train.csv)")
    z.add_argument("--val", help="validation images (default: the run's split_val.csv)")
    z.add_argument("--calib-images", type=int, default=200)
    z.add_argument("--val-limit", type=int, default=0, help="at most this many validation images (0 = all)")
    z.add_argument("--method", default="minmax", choices=["minmax", "percentile", "entropy"])
    z.add_argument("--max-auc-drop", type=float, default=0.002)
    z.add_argument("--fp32-out", help="also keep the fp32 ONNX export here")
    z.add_argument("--threads", type=int)
    z.add_argument("--json", metavar="FILE")
    z.set_defaults(func=_cmd_quantize)

    _add_load(sub)
    _add_precision_parity(sub)

    def no_action(_: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=no_action)
