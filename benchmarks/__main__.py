"""``python -m benchmarks ACTION ...`` (from the repository root) runs
``pneumoscan benchmark ACTION ...``: train, predict, serve or quantize."""
from __future__ import annotations

import sys

from pneumoscan.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
