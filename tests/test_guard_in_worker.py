"""The shipped guard run by the decoding worker process (``predict``'s default path): the same
answer as in the caller, a function only named, never trusted blindly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pneumoscan.data.decode_worker import after_spec
from pneumoscan.data.io import read_image_with_meta
from pneumoscan.data.isolated import decode_isolated
from pneumoscan.guard.core import Guard, GuardResult, check_in_worker
from pneumoscan.inference.reading import decode_file

FIXTURES = Path(__file__).parent / "fixtures"


def _inputs(tmp_path: Path) -> list[Path]:
    from PIL import Image

    files = sorted(p for p in (FIXTURES / "xray").rglob("*") if p.suffix.lower() in {".jpeg", ".jpg", ".png"})[:6]
    files += [FIXTURES / "dicom" / n for n in ("ct.dcm", "mono1_16bit.dcm", "mono2_8bit.dcm", "rescale_window.dcm")]
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise.png"  # refused by the classifier
    Image.fromarray((rng.random((256, 256)) * 255).astype(np.uint8)).save(noise)
    colour = tmp_path / "colour.png"  # refused by a rule
    Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8)).save(colour)
    return files + [noise, colour]


def test_worker_guard_matches_the_callers(tmp_path: Path) -> None:
    guard = Guard.default()
    assert guard.worker_check is check_in_worker
    seen = set()
    for path in _inputs(tmp_path):
        arr, meta = read_image_with_meta(path, max_side=224)
        here = guard.check(arr, meta)
        _, wmeta = decode_isolated(path, max_side=224, timeout_s=30, after=check_in_worker)
        there = GuardResult.from_worker(wmeta["after"])
        assert there is not None, path
        assert (there.ok, there.reason, there.rule) == (here.ok, here.reason, here.rule), path
        assert there.score == here.score, path  # unrounded, same pixels, same code
        rec = decode_file(str(path), max_side=224, input_size=224, guard=guard, timeout_s=30)
        assert rec.check is not None and rec.check.score == here.score
        assert (rec.input is not None) == here.ok
        seen.add(here.ok)
    assert seen == {True, False}  # both answers exercised


def test_only_named_package_functions_run_in_the_worker() -> None:
    assert after_spec(check_in_worker) == "pneumoscan.guard.core:check_in_worker"
    for bad in (lambda a, m: 1, np.mean, print):
        with pytest.raises(ValueError):
            after_spec(bad)
    first = sorted((FIXTURES / "xray").rglob("*.jpeg"))[0]
    _, meta = decode_isolated(first, max_side=64, timeout_s=30)
    assert "after" not in meta  # nothing asked, nothing passed on


@pytest.mark.parametrize("answer", [
    None, [], {"ok": True}, {"ok": "yes", "reason": None, "score": 0.9, "rule": None},
    {"ok": True, "reason": "x", "score": 0.9, "rule": None}, {"ok": False, "reason": "no", "score": 2.0, "rule": "classifier"},
    {"ok": False, "reason": "no", "score": 0.1, "rule": "made_up"}, {"ok": True, "reason": None, "score": True, "rule": None},
    {"ok": False, "reason": "x" * 501, "score": 0.1, "rule": "classifier"},
])
def test_malformed_worker_answers_are_not_trusted(answer: object) -> None:
    assert GuardResult.from_worker(answer) is None


def test_a_custom_guard_runs_in_the_caller() -> None:
    custom = Guard(dict(Guard.default().params))
    assert custom.worker_check is None


def test_the_service_takes_the_workers_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pneumoscan serve`` with the shipped guard checks uploads in the decoding worker (not
    under its model lock): the same answers, and the service's own process never runs it."""
    from fastapi.testclient import TestClient

    from pneumoscan.inference import load_predictor
    from pneumoscan.serving import create_app

    files = [p for p in _inputs(tmp_path) if p.suffix.lower() in {".jpeg", ".png"}]
    files = files[:2] + files[-2:]  # two chest films, noise (the classifier refuses), colour (a rule refuses)
    expected = {p: Guard.default().check(*read_image_with_meta(p, max_side=224)) for p in files}
    assert {r.ok for r in expected.values()} == {True, False}

    def not_here(*args: object, **kwargs: object) -> None:
        raise AssertionError("the guard ran in the service's process")

    monkeypatch.setattr(Guard, "check", not_here)
    with TestClient(create_app(load_predictor()), base_url="http://127.0.0.1") as client:
        for path, want in expected.items():
            ctype = "image/png" if path.suffix == ".png" else "image/jpeg"
            r = client.post("/v1/predict", files={"file": (path.name, path.read_bytes(), ctype)})
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["refused"] is None) == want.ok, (path, body["refused"])
            assert body["extra"]["guard_score"] == round(want.score, 4)


def test_workers_are_forked_with_the_guard_loaded() -> None:
    """The forkserver preloads the shipped guard (parameters and template bank), so that a new
    worker's first check does not spend its image's decode time limit on start-up."""
    import pneumoscan.guard.warm as warm
    from pneumoscan.data import forkserver
    from pneumoscan.guard.features import _bank_of

    assert "pneumoscan.guard.warm" in forkserver.PRELOAD
    assert warm.WARM is True and warm.warm() is True
    assert _bank_of.cache_info().currsize >= 1
