"""``pneumoscan export``: a checkpoint as ONNX, with calibration and threshold in its metadata."""
from __future__ import annotations

import argparse


def _cmd_export(args: argparse.Namespace) -> int:
    from ..inference.onnx_export import export_onnx

    out = export_onnx(args.checkpoint, args.out, opset=args.opset, exporter=args.exporter)
    print(out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` sub-command.

    Args:
        sub: the ``pneumoscan`` parser's sub-command action.
    """
    p = sub.add_parser("export", help="export a checkpoint to ONNX (calibration and threshold in its metadata)")
    p.add_argument("--checkpoint", help="a .pt checkpoint or run directory (default: the shipped model)")
    p.add_argument("--out", required=True, help="destination .onnx file")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17, default 18)")
    p.add_argument("--exporter", choices=["auto", "dynamo", "legacy"], default="auto",
                   help="torch.export-based (dynamo), TorchScript (legacy), or auto (dynamo, then legacy)")
    p.set_defaults(func=_cmd_export)
