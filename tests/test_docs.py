"""The documentation's relative links and images point at files that exist, and the README
shows what the project promises (a heat-map figure, a report screenshot, the two set-up
commands first)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "DEVELOPERS.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    missing = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{doc.name} links to missing files: {missing}"


def test_readme_shows_figures_and_starts_with_two_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    images = [t for t in LINK.findall(text) if t.endswith((".png", ".jpg"))]
    assert any("heatmap" in t for t in images) and any("report" in t for t in images)
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert block is not None
    lines = [ln for ln in block.group(1).splitlines() if ln.strip()]
    assert lines == ['pip install -e ".[all,dev]" && pneumoscan predict --samples --heatmap heatmaps/', "python -m pytest -q"]
