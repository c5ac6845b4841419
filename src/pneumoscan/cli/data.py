"""``pneumoscan data summary``: images, patients, sizes, duplicates and balance of a dataset."""
from __future__ import annotations

import argparse
import json


def _cmd_data_summary(args: argparse.Namespace) -> int:
    from ..data.summary import format_summary, summarize

    s = summarize(args.data)
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` sub-command and its actions.

    Args:
        subparsers: the ``pneumoscan`` parser's sub-command action.
    """
    p = subparsers.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    ps = dsub.add_parser("summary", help="images, patients, sizes, duplicates and balance of a dataset")
    ps.add_argument("data", help="dataset folder or CSV manifest")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=_cmd_data_summary)
