"""``pneumoscan guard {check,fit,evaluate}``: the not-a-chest-X-ray guard."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..errors import ConfigError, PneumoscanError
from .predict import expand_inputs

log = logging.getLogger(__name__)


def _cmd_guard_check(args: argparse.Namespace) -> int:
    from ..guard import Guard

    guard = Guard.from_file(args.params) if args.params else Guard.default()
    failed = False
    for p, why in expand_inputs(args.paths):
        if why is not None:
            failed = True
            log.error("%s: %s", p, why)
            continue
        try:
            res = guard.check_source(p)
        except PneumoscanError as e:
            failed = True
            if args.json:
                print(json.dumps({"path": p, "error": getattr(e, "reason", str(e))}))
            else:
                print(f"{p}  ERROR: {getattr(e, 'reason', str(e))}")
            continue
        if args.json:
            print(json.dumps({"path": p, **res.to_dict()}))
        else:
            print(f"{p}  {'ok' if res.ok else 'REFUSED: ' + str(res.reason)}  (score {res.score:.3f})")
    return 1 if failed else 0


def _cmd_guard_fit(args: argparse.Namespace) -> int:
    from ..guard.core import default_guard_path
    from ..workflows.guard_fit import default_data_root, fit_guard, format_report

    data = Path(args.data) if args.data else default_data_root()
    if data is None:
        raise ConfigError("guard fit needs --data ROOT (holding chest_xray_224/ and chest_xray_fullres/)")
    out = None if args.dry_run else Path(args.out) if args.out else default_guard_path()
    report = fit_guard(data, out, seed=args.seed, limit=args.limit, progress=not args.no_progress and sys.stderr.isatty())
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "params"}, indent=2))
    else:
        print(format_report(report))
        if out is not None:
            print(f"wrote {out}")
    return 0


def _cmd_guard_evaluate(args: argparse.Namespace) -> int:
    from ..guard import Guard
    from ..workflows.guard_fit import default_data_root, evaluate_guard, format_report

    data = Path(args.data) if args.data else default_data_root()
    if data is None:
        raise ConfigError("guard evaluate needs --data ROOT (holding chest_xray_224/ and chest_xray_fullres/)")
    guard = Guard.from_file(args.params) if args.params else Guard.default()
    report = evaluate_guard(data, guard, seed=args.seed, per_family=args.per_family, n_generated=args.generated,
                            bundled_variants=args.bundled_variants, limit=args.limit,
                            progress=not args.no_progress and sys.stderr.isatty())
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``guard`` sub-command and its actions.

    Args:
        sub: the ``pneumoscan`` parser's sub-command action.
    """
    p = sub.add_parser("guard", help="the not-a-chest-X-ray guard: check images, refit it")
    p.set_defaults(func=lambda _args: (p.print_help(sys.stderr), 2)[1])
    gsub = p.add_subparsers(dest="guard_command", metavar="ACTION")
    c = gsub.add_parser("check", help="say whether images look like frontal chest X-rays")
    c.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    c.add_argument("--params", help="guard parameters JSON (default: the shipped ones)")
    c.add_argument("--json", action="store_true", help="one JSON object per line")
    c.set_defaults(func=_cmd_guard_check)
    f = gsub.add_parser("fit", help="refit the guard (needs scikit-image) and print its held-out rates")
    f.add_argument("--data", help="data root with chest_xray_224/ and chest_xray_fullres/ (default: $PNEUMOSCAN_DATA or ../shared/data)")
    f.add_argument("--out", help="where to write guard.json (default: the package's assets/guard/guard.json)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--limit", type=int, help="use at most N chest_xray_224/train images (quick check)")
    f.add_argument("--dry-run", action="store_true", help="fit and report, write nothing")
    f.add_argument("--json", action="store_true", help="print the report as JSON")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=_cmd_guard_fit)
    e = gsub.add_parser("evaluate", help="measure a fitted guard on the held-out images of its fit, per family")
    e.add_argument("--data", help="data root with chest_xray_224/ and chest_xray_fullres/ (default: $PNEUMOSCAN_DATA or ../shared/data)")
    e.add_argument("--params", help="guard parameters JSON (default: the shipped ones)")
    e.add_argument("--seed", type=int, help="seed of the guard's fit (default: the one it records)")
    e.add_argument("--per-family", type=int, default=150, help="held-out chest X-rays per transformation family")
    e.add_argument("--generated", type=int, default=60, help="generated non-X-rays per category")
    e.add_argument("--bundled-variants", type=int, default=12, help="augmented variants of each held-out bundled image")
    e.add_argument("--limit", type=int, help="use at most N chest_xray_224/train images (quick check)")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_cmd_guard_evaluate)
