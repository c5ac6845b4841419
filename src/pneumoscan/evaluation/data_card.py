"""What a model card says about the training data, read from the data instead of assumed:
a data card file (YAML, or Markdown with YAML front matter: ``name``, ``source``, ``license``,
``citation``, ``population``) or the README of the data folder (its front matter, its
``Source:`` / ``Licence:`` / ``Citation:`` / ``Population:`` lines, else its first paragraph).

Nothing here knows any particular dataset: a fact that the files do not state stays ``None``
and the card says it is unknown.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import DataError

log = logging.getLogger(__name__)

#: The facts of a data card.
DATA_CARD_FIELDS: tuple[str, ...] = ("name", "source", "license", "citation", "population")
#: Files searched (case-insensitively, in this order) in the data folder, then in its parent.
DATA_CARD_FILES: tuple[str, ...] = ("data_card.yaml", "data_card.yml", "data_card.md", "datacard.md", "readme.md", "readme.txt", "readme")
#: Front-matter / YAML keys accepted for each fact.
_ALIASES = {"name": ("name", "pretty_name", "dataset", "title"), "source": ("source", "homepage", "url"),
            "license": ("license", "licence"), "citation": ("citation", "cite", "cite_as"), "population": ("population",)}
_FRONT = re.compile(r"\A\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.S)
_LABEL = re.compile(r"^\s*(?:[-*+]\s+)?(?:\*\*|__)?(name|dataset|source|licen[cs]e|citation|cite as|population)(?:\*\*|__)?\s*:"
                    r"\s*(?:\*\*|__)?\s*(.*)$", re.I)
_CC = re.compile(r"\bCC[ -]?(?:0|BY(?:[ -](?:NC|SA|ND))*)(?:[ -]\d\.\d)?\b", re.I)
_OTHER_LICENCES = re.compile(r"\b(MIT|Apache[ -]2\.0|BSD[ -][23][ -]Clause|ODbL(?:[ -]1\.0)?|PDDL(?:[ -]1\.0)?|public domain)\b", re.I)
_DOI = re.compile(r"\b(?:doi:\s*|https?://(?:dx\.)?doi\.org/)10\.\d{4,9}/\S+", re.I)
_POPULATION = re.compile(r"\b(paediatric|pediatric|adults?|child(?:ren)?|infants?|neonat\w*|aged|years? old|patients? (?:from|at|of)|"
                         r"hospitals?|medical cent(?:er|re)|centres?|centers?|sites?|population)\b", re.I)
_ABS_PATH = re.compile(r"(?<![\w:/.~])(?:[A-Za-z]:\\|/)(?:[^\s/\\`'\"()]+[/\\])+([^\s/\\`'\"()]*)")


def load_data_card(data_root_or_file: str | Path | None) -> dict[str, Any]:
    """The facts about a data set that a model card shows.

    Args:
        data_root_or_file: a data card file (``.yaml``/``.yml``, or Markdown with front
            matter), a data folder (its data card or README is read, else its parent's; the
            parent's only when it states ``Source:`` or has front matter), or a CSV manifest
            (its folder is searched). ``None`` or a folder without such a file: nothing known.

    Returns:
        ``name``, ``source``, ``license``, ``citation``, ``population`` (``None`` where unknown)
        and ``file``: the name (never the path) of the file read, or ``None``.

    Raises:
        DataError: an explicit data card file that is missing or not valid YAML.
    """
    empty: dict[str, Any] = {k: None for k in DATA_CARD_FIELDS} | {"file": None}
    if data_root_or_file is None or str(data_root_or_file) == "":
        return empty
    p = Path(data_root_or_file)
    if p.is_file() and p.suffix.lower() != ".csv":
        return _read_card(p, strict=True, fallbacks=True)
    if p.suffix.lower() == ".csv" and not p.is_dir():
        p = p.parent
    if not p.is_dir():
        if p.suffix.lower() in (".yaml", ".yml", ".md", ".txt"):
            raise DataError(f"data card not found: {p.name}")
        return empty
    for level, folder in enumerate((p, p.parent)):
        f = _find_card(folder)
        if f is None:
            continue
        card = _read_card(f, strict=False, fallbacks=level == 0)
        if level == 0 or card["source"] or card["name"] and card["license"]:
            return card
    return empty


def resolve_data_card(data_card: Mapping[str, Any] | str | Path | None, data_root: str | Path | None) -> dict[str, Any]:
    """The data card of a model card: given facts, a given file, or what the data folder says.

    Args:
        data_card: facts (a mapping with :data:`DATA_CARD_FIELDS`), a data card file, or
            ``None`` to read the data folder.
        data_root: the training data folder or manifest (used when ``data_card`` is ``None``).
    """
    if isinstance(data_card, Mapping):
        return _normalise(data_card) | {"file": None}
    return load_data_card(data_card if data_card is not None else data_root)


def hf_license(license_text: str | None) -> str:
    """A Hugging Face ``license:`` identifier (``cc-by-4.0``, ``mit``, ...): ``unknown`` when
    the licence is unknown, ``other`` when it is not a common identifier.

    Args:
        license_text: the licence as the data card states it.
    """
    if not license_text:
        return "unknown"
    m = _CC.search(license_text)
    if m:
        parts = re.findall(r"\d\.\d|0|by|nc|sa|nd", m.group(0).lower()[2:])
        if parts[0] == "0":
            return "cc0-1.0"
        return "cc-" + "-".join(parts) if re.fullmatch(r"\d\.\d", parts[-1]) else "other"
    m = _OTHER_LICENCES.search(license_text)
    ident = re.sub(r"[\s_]+", "-", m.group(0).lower()) if m else "other"
    return "other" if ident == "public-domain" else re.sub(r"-1\.0$", "", ident) if ident.startswith(("odbl", "pddl")) else ident


def strip_paths(text: str) -> str:
    """``text`` with every absolute file path replaced by its last part (file or folder name).

    Args:
        text: any text.
    """
    return _ABS_PATH.sub(lambda m: m.group(1) or m.group(0).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1], text)


# --------------------------------------------------------------------------- reading
def _find_card(folder: Path) -> Path | None:
    try:
        files = {f.name.lower(): f for f in folder.iterdir() if f.is_file()}
    except OSError:
        return None
    return next((files[n] for n in DATA_CARD_FILES if n in files), None)


def _read_card(path: Path, *, strict: bool, fallbacks: bool) -> dict[str, Any]:
    """The facts of one file; ``strict``: a YAML error raises, else the file is ignored."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read data card {path.name}: {e}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            meta, body = yaml.safe_load(text) or {}, ""
        else:
            m = _FRONT.match(text)
            meta, body = (yaml.safe_load(m.group(1)) or {}, text[m.end():]) if m else ({}, text)
    except yaml.YAMLError as e:
        if strict:
            raise DataError(f"data card {path.name} is not valid YAML: {str(e).splitlines()[0]}") from None
        log.warning("ignoring the front matter of %s: not valid YAML", path.name)
        meta, body = {}, text
    if not isinstance(meta, Mapping):
        if strict:
            raise DataError(f"data card {path.name} must be a YAML mapping (name, source, license, citation, population)")
        meta = {}
    card = _normalise(meta)
    for key, value in _labelled(body).items():
        card[key] = card[key] or value
    if fallbacks or card["source"]:
        _infer(card, body)
    return card | {"file": path.name}


def _normalise(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The known facts of a mapping (aliases resolved; lists joined; paths stripped)."""
    low = {str(k).lower(): v for k, v in meta.items()}
    out: dict[str, Any] = {}
    for key, names in _ALIASES.items():
        v = next((low[n] for n in names if low.get(n) not in (None, "", [])), None)
        if isinstance(v, (list, tuple)):
            v = ", ".join(str(x) for x in v)
        out[key] = _clean(str(v)) if v is not None else None
    return out


def _clean(text: str) -> str | None:
    t = re.sub(r"\s+", " ", text.replace("**", "").replace("__", "")).strip()
    return strip_paths(t) or None


def _paragraphs(body: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", body) if p.strip()]


def _labelled(body: str) -> dict[str, str]:
    """``Source:``-style lines (a value runs on over the following lines of its paragraph)."""
    out: dict[str, str] = {}
    for para in _paragraphs(body):
        key, value = None, []
        for line in para.splitlines() + [""]:
            m = _LABEL.match(line)
            if (m or not line.strip() or re.match(r"\s*([-*+]\s|#|\|)", line)) and key:
                out.setdefault(key, _clean(" ".join(value)) or "")
                key = None
            if m:
                word = m.group(1).lower()
                key = {"dataset": "name", "cite as": "citation"}.get(word, "license" if word.startswith("licen") else word)
                value = [m.group(2)]
            elif key:
                value.append(line)
    return {k: v for k, v in out.items() if v}


def _infer(card: dict[str, Any], body: str) -> None:
    """Facts a README states without labels: its title, its first paragraph as the source, a
    licence named in it, a DOI citation, sentences describing the population."""
    paras = _paragraphs(body)
    if not card["name"]:
        card["name"] = next((_clean(p.splitlines()[0].lstrip("#")) for p in paras if re.match(r"#\s", p)), None)
    text_paras = [p for p in paras if not re.match(r"(#|\||```|<!--|!\[|[-*+]\s)", p) and not _LABEL.match(p.splitlines()[0])]
    first = _clean(" ".join(text_paras[0].splitlines())) if text_paras else None
    described = card["source"] or first or ""
    if not card["source"] and first:
        card["source"] = first[:600] + ("…" if len(first) > 600 else "")
    if not card["license"]:
        m = _CC.search(described) or _OTHER_LICENCES.search(described)
        card["license"] = m.group(0) if m else None
    if card["source"]:  # "X, doi:... — licensed CC BY 4.0 (...). Children from ..." → "X, doi:..."
        card["source"] = re.split(r"\s*[—–;,(]?\s*\b(?:licen[cs]ed|released under|available under)\b", card["source"], 1, re.I)[0].strip()
    if not card["citation"] and card["source"] and _DOI.search(card["source"]):
        card["citation"] = card["source"].rstrip(" .;,")
    if not card["population"]:
        sentences = re.split(r"(?<=[.;])\s+(?=[A-Z])", described)
        found = [s for s in sentences if _POPULATION.search(s) and not _DOI.search(s)]
        card["population"] = " ".join(found) or None
