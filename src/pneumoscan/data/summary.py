"""``pneumoscan data summary``: what a researcher looks at first."""
from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..core.labels import CLASS_NAMES
from ..errors import DataError, ImageReadError
from ..utils.io import sha256_file
from .datasets import Sample, load_samples


def _image_size(path: str) -> tuple[int, int] | None:
    """Original ``(width, height)``, or ``None`` when pneumoscan's reader cannot decode the
    file (a readable header is not enough: truncated or unsupported files count as unreadable)."""
    from .io import read_image_with_meta

    try:
        return read_image_with_meta(path, max_side=256)[1]["original_size"]
    except ImageReadError:
        return None


def summarize(data: str | Path, splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, Any]:
    """Images per split and class, patients, image-size statistics, exact duplicates (sha256)
    within and across splits, patients shared between splits, and class balance.

    Args:
        data: dataset folder or CSV manifest.
        splits: split names to look for.
    """
    data = Path(data)
    per_split: dict[str, list[Sample]] = {}
    if data.suffix.lower() == ".csv" or not any((data / s).is_dir() for s in splits):
        per_split["all"] = load_samples(data, None)
    else:
        for s in splits:
            if (data / s).is_dir():
                per_split[s] = load_samples(data, s)
    if not per_split:
        raise DataError(f"{data}: no images found")
    hashes: dict[str, list[tuple[str, str]]] = defaultdict(list)
    out: dict[str, Any] = {"root": str(data), "splits": {}}
    for split, samples in per_split.items():
        sizes, unreadable = [], 0
        for s in samples:
            hashes[sha256_file(s.path)].append((split, s.path))
            sz = _image_size(s.path)
            if sz is None:
                unreadable += 1
            else:
                sizes.append(sz)
        counts = Counter(s.label for s in samples)
        w = np.array([s[0] for s in sizes]) if sizes else np.zeros(1)
        h = np.array([s[1] for s in sizes]) if sizes else np.zeros(1)
        out["splits"][split] = {
            "images": len(samples),
            "per_class": {CLASS_NAMES[c]: counts.get(c, 0) for c in (0, 1)},
            "patients": len({s.patient for s in samples}),
            "patients_per_class": {CLASS_NAMES[c]: len({s.patient for s in samples if s.label == c}) for c in (0, 1)},
            "pneumonia_share": counts.get(1, 0) / max(len(samples), 1),
            "width": {"min": int(w.min()), "median": float(np.median(w)), "max": int(w.max())},
            "height": {"min": int(h.min()), "median": float(np.median(h)), "max": int(h.max())},
            "unreadable": unreadable,
        }
    dups = [v for v in hashes.values() if len(v) > 1]
    out["duplicates"] = {
        "groups": len(dups),
        "images": sum(len(v) for v in dups),
        "cross_split_groups": sum(1 for v in dups if len({s for s, _ in v}) > 1),
        "examples": [[p for _, p in v] for v in dups[:5]],
    }
    pats = {sp: {s.patient for s in smp} for sp, smp in per_split.items()}
    names = list(pats)
    out["patients_shared_between_splits"] = {
        f"{a}/{b}": len(pats[a] & pats[b]) for i, a in enumerate(names) for b in names[i + 1:]
    }
    return out


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable table of :func:`summarize`'s output."""
    lines = [f"dataset: {s['root']}", ""]
    lines.append(f"{'split':<7}{'images':>8}{'NORMAL':>8}{'PNEUM.':>8}{'%pneu':>7}{'patients':>10}  {'size (w×h median, min–max)':<30}{'unreadable':>11}")
    for name, d in s["splits"].items():
        size = f"{d['width']['median']:.0f}×{d['height']['median']:.0f} ({d['width']['min']}–{d['width']['max']} × {d['height']['min']}–{d['height']['max']})"
        lines.append(
            f"{name:<7}{d['images']:>8}{d['per_class']['NORMAL']:>8}{d['per_class']['PNEUMONIA']:>8}"
            f"{100 * d['pneumonia_share']:>6.1f}%{d['patients']:>10}  {size:<30}{d['unreadable']:>11}"
        )
    dup = s["duplicates"]
    lines += ["", f"exact duplicates (sha256): {dup['groups']} groups, {dup['images']} images, {dup['cross_split_groups']} groups across splits"]
    for ex in dup["examples"]:
        lines.append("  " + "  ==  ".join(ex))
    for k, v in s["patients_shared_between_splits"].items():
        lines.append(f"patients shared {k}: {v}")
    bal = [d["pneumonia_share"] for d in s["splits"].values()]
    lines.append(f"class balance: PNEUMONIA share {', '.join(f'{b:.1%}' for b in bal)} → use class-weighted loss or a weighted sampler")
    return "\n".join(lines)
