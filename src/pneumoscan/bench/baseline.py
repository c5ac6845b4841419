"""The hand-written reference loop the inference benchmarks compare against: a torchvision
model in eager fp32, one image at a time, full-size Pillow decoding and torchvision
transforms — what a quick script around a checkpoint typically looks like.

Runnable as a process for end-to-end timing::

    python -m pneumoscan.bench.baseline FOLDER --checkpoint CKPT
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..data.io import IMAGE_SUFFIXES
from ..models.bundle import ModelBundle


def naive_loop(bundle: ModelBundle) -> Callable[[str], float]:
    """``predict(path) -> probability`` built the naive way (fp32 eager, batch of one).

    Args:
        bundle: a loaded model (its network, temperature and input size are used).
    """
    from PIL import Image
    from torchvision import transforms

    model = bundle.build_model().eval()
    size = bundle.input_size
    temperature = bundle.temperature
    tf = transforms.Compose([transforms.Grayscale(1), transforms.Resize((size, size)), transforms.ToTensor()])

    def predict(path: str) -> float:
        with Image.open(path) as im:
            x = tf(im.convert("RGB"))
        with torch.no_grad():
            logit = model(x.unsqueeze(0))
        return float(torch.sigmoid(logit / temperature))

    return predict


def list_images(folder: str | Path) -> list[str]:
    """Image files under ``folder`` (recursive, sorted)."""
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def main(argv: Sequence[str] | None = None) -> int:
    """Predict every image of a folder with the naive loop; print one probability per line."""
    from ..errors import PneumoscanError
    from ..models.bundle import load_bundle

    ap = argparse.ArgumentParser(prog="python -m pneumoscan.bench.baseline", description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--checkpoint", required=True)
    args = ap.parse_args(argv)
    try:
        t0 = time.perf_counter()
        predict = naive_loop(load_bundle(args.checkpoint))
        files = list_images(args.folder)
        for f in files:
            print(f"{f}\t{predict(f):.6f}")
    except PneumoscanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(files)} images in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
