"""``pneumoscan models``: the registered models and their parameter counts."""
from __future__ import annotations

import argparse
import json


def _cmd_models(args: argparse.Namespace) -> int:
    import torch

    from ..models import count_parameters, create_model, get_spec, list_models

    rows = []
    with torch.device("meta"):
        for name in list_models():
            spec = get_spec(name)
            m = create_model(name)
            rows.append({
                "name": name, "trainable_parameters": count_parameters(m), "total_parameters": count_parameters(m, False),
                "input": f"{spec.input_size}x{spec.input_size}x1 -> {spec.in_channels}ch", "weights": "imagenet" if spec.pretrained else "none",
                "gradcam_layer": spec.gradcam_layer, "description": spec.description,
            })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<16}{'trainable':>13}{'input':>20}  {'pretrained':<11}description")
    for r in rows:
        print(f"{r['name']:<16}{r['trainable_parameters']:>13,}{r['input']:>20}  {r['weights']:<11}{r['description']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` sub-command.

    Args:
        subparsers: the ``pneumoscan`` parser's sub-command action.
    """
    p = subparsers.add_parser("models", help="list registered models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_models)
