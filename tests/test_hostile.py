"""Hostile inputs: every file of the corpus in ``tests/hostile.py`` either reads as a valid
image or raises one specific ImageReadError naming the file — never a traceback, a hang or
unbounded memory. The same holds through the CLI (``pneumoscan data summary`` and, when it is
installed, ``pneumoscan predict``)."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pneumoscan.data.io import MAX_FILE_BYTES, read_image, read_image_with_meta
from pneumoscan.errors import ImageReadError, ImageTooLargeError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostile import make_corpus, make_path_corpus  # noqa: E402

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
#: Peak resident memory allowed for one child reading one hostile file.
RSS_LIMIT_MB = 2500
#: Seconds one file may take before it counts as a hang.
PER_FILE_TIMEOUT = 60
#: The corpus entries that decode 64 megapixels (read only in the measured subprocess).
HEAVY = {"max_8000.png", "deflate_8000.dcm"}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="session")
def path_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_path_corpus(tmp_path_factory.mktemp("hostile_paths"))


def _check_valid(arr: np.ndarray) -> None:
    assert arr.ndim == 2 and arr.dtype == np.float32 and arr.size > 0
    assert np.isfinite(arr).all()
    assert float(arr.min()) >= 0.0 and float(arr.max()) <= 1.0


NAMES = sorted([
    "zero_bytes.png", "text.png", "html.jpeg", "pdf.jpg", "eps.png", "icon.png", "random.dcm", "truncated.jpeg",
    "bomb_60000.png", "huge_20000.png", "jpeg_declares_20000.jpeg", "gif_declares_65535.gif", "ztxt_bomb.png",
    "deflate_bomb.dcm", "one_pixel.png", "png16.png", "cmyk.jpeg", "animated.gif", "image16.tiff", "float_nan.tiff",
    "jpeg_named.png", "png_named.dcm", "no_pixels.dcm", "jpegls_bogus.dcm", "jpeg2000_corrupt.dcm", "ct.dcm",
])


def test_corpus_names_are_all_tested(corpus: dict) -> None:
    assert set(corpus) == set(NAMES) | HEAVY


@pytest.mark.parametrize("name", NAMES)
def test_reader_on_hostile_file(corpus: dict, name: str) -> None:
    path, expect = corpus[name]
    if expect == "ok":
        arr, meta = read_image_with_meta(path, max_side=224)
        _check_valid(arr)
        assert meta["format"] in {"JPEG", "PNG", "GIF", "TIFF", "DICOM"}
        return
    with pytest.raises(ImageReadError) as ei:
        read_image(path, max_side=224)
    assert type(ei.value) is expect, f"{name}: expected {expect.__name__}, got {type(ei.value).__name__}: {ei.value}"
    msg = str(ei.value)
    assert msg.startswith(str(path) + ": "), msg  # names the file
    assert "\n" not in msg and len(msg) < 400


@pytest.mark.parametrize("name", NAMES)
def test_bytes_and_stream_sources_behave_like_paths(corpus: dict, name: str) -> None:
    """The web service reads uploads as bytes: same outcome, error named after the upload."""
    path, expect = corpus[name]
    data = path.read_bytes()
    for source in (data, io.BytesIO(data)):
        if expect == "ok":
            _check_valid(read_image(source, name=name, max_side=224))
        else:
            with pytest.raises(expect) as ei:
                read_image(source, name=name, max_side=224)
            assert str(ei.value).startswith(f"{name}: ")


class _Hang(Exception):
    """Raised by SIGALRM when the reader blocks (not an OSError, so nothing can mask it)."""


def _on_alarm(signum: int, frame: object) -> None:
    raise _Hang("the reader blocked on a special file")


# /dev/zero is only read in the measured child process: a regression would eat memory here.
@pytest.mark.parametrize("name", ["fifo.png", "folder.png", "missing.png", "dangling.png"])
def test_special_paths_fail_fast(path_corpus: dict, name: str) -> None:
    if name not in path_corpus:
        pytest.skip(f"{name} cannot be made on this platform")
    path, _ = path_corpus[name]
    t0 = time.perf_counter()
    old = signal.signal(signal.SIGALRM, _on_alarm) if hasattr(signal, "SIGALRM") else None
    if old is not None:
        signal.alarm(10)  # a FIFO opened for reading blocks until a writer comes: fail, never hang
    try:
        with pytest.raises(ImageReadError) as ei:
            read_image(path)
    finally:
        if old is not None:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    assert time.perf_counter() - t0 < 5, "a special file must be refused without reading it"
    assert type(ei.value) is ImageReadError and str(ei.value).startswith(str(path))


def test_oversized_file_and_bytes_are_refused_before_decoding(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    with open(big, "wb") as fh:  # sparse file: no disk space used
        fh.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(ImageTooLargeError, match="file too large"):
        read_image(big)

    class Endless(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:  # an upload that never ends
            b[:] = b"\0" * len(b)
            return len(b)

    with pytest.raises(ImageTooLargeError):
        read_image(io.BufferedReader(Endless()), name="endless.png")


def test_text_mode_stream_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "x.png"
    f.write_text("not binary")
    with open(f, encoding="utf-8") as fh, pytest.raises(ImageReadError, match="binary"):
        read_image(fh)  # type: ignore[arg-type]


@pytest.mark.slow
def test_every_file_in_a_child_process_bounded_time_and_memory(corpus: dict, path_corpus: dict, tmp_path: Path) -> None:
    """Each file (the 64-megapixel ones included) is read in its own forked child: the
    outcome matches, no child crashes, hangs or exceeds RSS_LIMIT_MB."""
    if not hasattr(os, "fork"):
        pytest.skip("needs fork")
    folder = next(iter(corpus.values()))[0].parent
    expected = {n: e for n, (_, e) in corpus.items()}
    expected.update({n: e for n, (_, e) in path_corpus.items()})
    records = []
    for d in (folder, next(iter(path_corpus.values()))[0].parent):
        p = subprocess.run(
            [sys.executable, str(TESTS / "hostile.py"), "measure", str(d), "--timeout", str(PER_FILE_TIMEOUT)],
            capture_output=True, text=True, timeout=30 * PER_FILE_TIMEOUT, cwd=REPO,
        )
        assert p.returncode == 0, p.stderr[-2000:]
        records += [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    seen = {r["name"] for r in records}
    assert set(expected) - {"missing.png"} <= seen
    for r in records:
        if r["name"] not in expected:
            continue
        exp = expected[r["name"]]
        assert r["outcome"] in ("ok", "error"), f"{r['name']}: {r}"
        if exp == "ok":
            assert r["outcome"] == "ok", r
        else:
            assert r["outcome"] == "error" and r["error"] == exp.__name__, r
        assert r["peak_rss_mb"] < RSS_LIMIT_MB, r
        assert r["seconds"] < PER_FILE_TIMEOUT, r


# --------------------------------------------------------------------------- CLI
_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[1:])\n"
    "sys.stderr.write('\\nPEAK_RSS_KB=%d\\n' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(rc)\n"
)


def _run_measured(argv: list[str], timeout: float) -> tuple[int, str, str, float]:
    """Run a command; return exit code, stdout, stderr and its peak RSS in MB.

    A small wrapper process runs the command and reports ``getrusage(RUSAGE_CHILDREN)``:
    its only child is the command, so the figure is that command's own peak.
    """
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen([sys.executable, "-c", _WRAPPER, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the wrapper and the command it runs
            p.communicate()
            raise AssertionError(f"{argv[2:5]} hung for more than {timeout}s") from None
    err, _, tail = err.rpartition("\nPEAK_RSS_KB=")
    return p.returncode, out, err, int(tail.strip()) / 1024


def _hostile_dataset(root: Path, corpus: dict, path_corpus: dict, xray_dir: Path) -> tuple[list[str], list[str]]:
    """A dataset whose NORMAL folder mixes real images with the light corpus files."""
    good, bad = [], []
    for cls in ("NORMAL", "PNEUMONIA"):
        d = root / "train" / cls
        d.mkdir(parents=True)
        for src in sorted((xray_dir / "train" / cls).iterdir())[:2]:
            shutil.copy(src, d / src.name)
            good.append(src.name)
    for name, (path, expect) in corpus.items():
        if name in HEAVY:
            continue
        shutil.copy(path, root / "train" / "NORMAL" / name)
        (good if expect == "ok" else bad).append(name)
    for name in ("fifo.png", "devzero.png"):
        if name in path_corpus:
            os.symlink(path_corpus[name][0], root / "train" / "NORMAL" / name)
    return good, bad


@pytest.mark.slow
def test_cli_data_summary_survives_hostile_folder(corpus: dict, path_corpus: dict, xray_dir: Path, tmp_path: Path) -> None:
    good, bad = _hostile_dataset(tmp_path / "ds", corpus, path_corpus, xray_dir)
    code, out, err, rss = _run_measured([sys.executable, "-m", "pneumoscan", "data", "summary", str(tmp_path / "ds"), "--json"], 300)
    assert code == 0, err
    assert "Traceback" not in err
    s = json.loads(out)["splits"]["train"]
    assert s["images"] == len(good) + len(bad)  # the FIFO and /dev/zero are not regular files: skipped
    assert s["unreadable"] == len(bad)
    assert rss < RSS_LIMIT_MB


def _has_predict() -> bool:
    from pneumoscan.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return "predict" in sub.choices  # type: ignore[operator]


@pytest.mark.slow
def test_cli_predict_on_hostile_files(corpus: dict, path_corpus: dict, xray_dir: Path, request: pytest.FixtureRequest) -> None:
    """``pneumoscan predict`` on good and hostile files at once: each bad file gets one answer
    with its error and one stderr line naming it, the other files are still answered (a
    prediction, or a refusal by the not-a-chest-X-ray guard), exit 1, no traceback, bounded
    memory."""
    if not _has_predict():
        pytest.skip("pneumoscan predict is not installed yet")
    tiny_run: Path = request.getfixturevalue("tiny_run")  # trained only when the command exists
    xrays = [sorted((xray_dir / "val" / c).iterdir())[0] for c in ("NORMAL", "PNEUMONIA")]
    readable = [p for n, (p, e) in corpus.items() if e == "ok"]
    bad = [p for n, (p, e) in corpus.items() if e != "ok"] + [p for n, (p, _) in path_corpus.items() if n != "folder.png"]
    inputs = [*xrays, *readable, *bad]
    argv = [sys.executable, "-m", "pneumoscan", "predict", "--checkpoint", str(tiny_run), "--format", "json",
            "--no-progress", *map(str, inputs)]
    code, out, err, rss = _run_measured(argv, 600)
    assert code == 1, err[-2000:]
    assert "Traceback" not in out + err
    assert rss < RSS_LIMIT_MB
    answers = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [a["path"] for a in answers] == [str(p) for p in inputs]  # one answer each, in input order
    by_path = {a["path"]: a for a in answers}
    for p in xrays:
        a = by_path[str(p)]
        assert "error" not in a and "refused" not in a and 0.0 <= a["probability"] <= 1.0, a
    for p in readable:
        a = by_path[str(p)]
        assert "error" not in a, a  # read fine: a prediction or a guard refusal
        assert (a["probability"] is not None) != ("refused" in a), a
    err_lines = err.splitlines()
    for p in bad:
        a = by_path[str(p)]
        assert a["probability"] is None and a.get("error"), a
        naming = [ln for ln in err_lines if ln.startswith(f"{p}: ")]
        assert len(naming) == 1, f"{p}: {naming}"
        assert naming[0] == f"{p}: {a['error']}"


@pytest.mark.slow
def test_cli_predict_many_64_megapixel_images_bounded_memory(corpus: dict, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Memory does not grow with the number of huge inputs: ten 64-megapixel images (PNG and
    deflated DICOM) in one run stay under the bound although prediction reads ahead in
    threads (the reader decodes one huge image at a time, reduces it to the size the model
    needs and returns the freed heap)."""
    if not _has_predict():
        pytest.skip("pneumoscan predict is not installed yet")
    tiny_run: Path = request.getfixturevalue("tiny_run")
    files = []
    for i in range(10):
        src = corpus["max_8000.png" if i % 5 else "deflate_8000.dcm"][0]
        link = tmp_path / f"{i:02d}_{src.name}"
        link.symlink_to(src)
        files.append(link)
    argv = [sys.executable, "-m", "pneumoscan", "predict", "--checkpoint", str(tiny_run), "--format", "json",
            "--no-progress", "--no-guard", *map(str, files)]
    code, out, err, rss = _run_measured(argv, 900)
    assert code == 0, err[-2000:]
    answers = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(answers) == 10 and all(0.0 <= a["probability"] <= 1.0 for a in answers)
    assert rss < RSS_LIMIT_MB, f"peak RSS {rss:.0f} MB"
