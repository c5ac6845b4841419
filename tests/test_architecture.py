"""The architecture holds: the import-linter layer contract (pyproject.toml), no source file
over 500 lines, and one definition of the things there must be one of."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "pneumoscan"
MAX_LINES = 500


def _lint_imports() -> list[str]:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    return [exe]


def test_layer_contract_is_kept() -> None:
    res = subprocess.run([*_lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_no_source_file_over_500_lines() -> None:
    big = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not big, f"split these files by concern: {big}"


@pytest.mark.parametrize("pattern", [
    r'^\s*_?CLASS_NAMES\b[^=]*=\s*\(',     # class names: pneumoscan.core.labels
    r"^def (sigmoid|roc_auc|threshold_metrics|jet|overlay|resize_float|to_uint8)\(",
])
def test_one_definition(pattern: str) -> None:
    hits = [f"{p.relative_to(SRC)}:{m.group(0).strip()}" for p in SRC.rglob("*.py")
            for m in re.finditer(pattern, p.read_text(encoding="utf-8"), flags=re.M)]
    names = [h.split(":", 1)[1] for h in hits]
    dup = sorted({h for h in hits if names.count(h.split(":", 1)[1]) > 1})
    assert not dup, f"defined more than once: {dup}"
