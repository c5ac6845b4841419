"""``pneumoscan weights import``: verify a downloaded weights file and put it in the torch hub cache."""
from __future__ import annotations

import argparse


def _cmd_weights_import(args: argparse.Namespace) -> int:
    from ..models.weights import import_weights

    target = import_weights(args.file, sha256=args.sha256, dest_dir=args.dest)
    print(target)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``weights`` sub-command and its actions.

    Args:
        subparsers: the ``pneumoscan`` parser's sub-command action.
    """
    p = subparsers.add_parser("weights", help="pretrained weight files")
    wsub = p.add_subparsers(dest="weights_command", metavar="ACTION")
    pi = wsub.add_parser("import", help="verify a downloaded weights file and place it in the torch hub cache")
    pi.add_argument("file")
    pi.add_argument("--sha256", help="expected sha256 (full or prefix) if the file name carries none")
    pi.add_argument("--dest", help="target folder (default: $TORCH_HOME/hub/checkpoints)")
    pi.set_defaults(func=_cmd_weights_import)
