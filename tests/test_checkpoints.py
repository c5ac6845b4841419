"""Files pneumoscan trusts: checkpoints load with ``weights_only=True`` (a pickle that would run
code is refused and the code does not run), shipped and imported weights are verified by
sha256, and every file is written atomically (a failure mid-write keeps the old file)."""
from __future__ import annotations

import ast
import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pneumoscan.errors import CheckpointError, WeightsError
from pneumoscan.models.weights import import_weights, load_state_dict_file, verify_file
from pneumoscan.models.bundle import ModelBundle, load_bundle, save_bundle
from pneumoscan.models import get_spec
from pneumoscan.utils.io import atomic_open, atomic_path, atomic_save_torch, atomic_write_bytes, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
MOBILENET = REPO.parent / "shared" / "weights" / "mobilenet_v2-b0353104.pth"


class _Payload:
    """Unpickling this calls ``os.mkdir(marker)``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# --------------------------------------------------------------------------- loading
def test_real_checkpoint_loads_and_rebuilds(tiny_run: Path) -> None:
    b = load_bundle(tiny_run)
    assert b.arch == "seed_cnn" and b.path == tiny_run / "best.pt"
    assert b.state_dict and b.val_metrics and b.threshold_method and "history" in b.provenance
    model = b.build_model()
    x = torch.rand(2, 1, b.input_size, b.input_size)
    assert model(x).shape == (2, 1)
    last = load_bundle(tiny_run / "last.pt")
    assert {"optimizer", "torch_rng"} <= set(last.training)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_code_carrying_checkpoint_is_refused_and_code_does_not_run(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model_name": "seed_cnn", "state_dict": {}, "extra": _Payload(marker)}, evil,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_bundle(evil)
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(evil, weights_only=False)
    assert marker.is_dir()


def test_plain_pickle_with_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model_name": "seed_cnn", "state_dict": _Payload(marker)}, protocol=2))
    with pytest.raises(CheckpointError):
        load_bundle(evil)
    assert not marker.exists()


def test_weights_file_with_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    evil = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(1), "x": _Payload(marker)}, evil)
    with pytest.raises(WeightsError, match="not a safe weights-only"):
        load_state_dict_file(evil)
    assert not marker.exists()


def test_resume_from_code_carrying_last_pt_fails_cleanly(tiny_run: Path, tmp_path: Path, cli) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    marker = tmp_path / "code-ran"
    torch.save({"model_name": "seed_cnn", "state_dict": {}, "x": _Payload(marker)}, run / "last.pt")
    r = cli("train", "--resume", run)
    assert r.code == 1
    assert len(r.err_lines) == 1 and "refused to load" in r.err_lines[0] and "Traceback" not in r.err
    assert not marker.exists()


def test_corrupt_checkpoints_raise_checkpoint_error(tiny_run: Path, tmp_path: Path) -> None:
    good = (tiny_run / "best.pt").read_bytes()
    cases = {
        "empty.pt": b"",
        "text.pt": b"not a checkpoint\n",
        "random.pt": os.urandom(4096),
        **{f"truncated{n}.pt": good[: len(good) * n // 8] for n in range(1, 8)},
        "bitflip.pt": good[:200] + bytes([good[200] ^ 0xFF]) + good[201:],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError):
            load_bundle(tmp_path / name)
    with pytest.raises(CheckpointError, match="not found"):
        load_bundle(tmp_path)  # a folder without best.pt


@pytest.mark.parametrize(
    "ckpt",
    [
        torch.zeros(3),
        {"state_dict": {}},
        {"model_name": "seed_cnn", "state_dict": [1, 2]},
        {"model_name": 7, "state_dict": {}},
        {"model_name": "seed_cnn", "state_dict": {"w": "not a tensor"}},
        {"model_name": "seed_cnn", "state_dict": {}, "model_kwargs": [1]},
    ],
    ids=["tensor", "no-name", "sd-list", "name-int", "sd-str", "kwargs-list"],
)
def test_malformed_checkpoints_are_refused(tmp_path: Path, ckpt: object) -> None:
    f = tmp_path / "bad.pt"
    torch.save(ckpt, f)
    with pytest.raises(CheckpointError):
        load_bundle(f)


def test_weights_that_do_not_fit_the_model(tiny_run: Path) -> None:
    b = load_bundle(tiny_run)
    wrong = b.replace(state_dict={k: v[..., :1] if v.ndim else v for k, v in b.state_dict.items()})
    with pytest.raises(CheckpointError, match="do not fit"):
        wrong.build_model()
    with pytest.raises(CheckpointError, match="do not fit"):  # a different input size changes the head
        b.replace(arch_kwargs={"input_size": 64}).build_model()
    with pytest.raises(CheckpointError, match="arguments do not fit"):  # cannot smuggle in weights=PATH
        b.replace(arch_kwargs={"weights": "/tmp/other.pth"}).build_model()


def test_shipped_default_model_is_verified_by_sha256(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pneumoscan.models import bundle as mb

    f = mb.save_default(load_bundle(tiny_run), tmp_path, "seed_cnn-test")
    monkeypatch.setattr(mb, "default_model_dir", lambda: tmp_path)
    b = load_bundle(None)
    assert b.name == "seed_cnn-test" and b.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    assert not b.training and all(v.dtype != torch.float32 for v in b.state_dict.values() if torch.is_floating_point(v))
    data = bytearray(f.read_bytes())
    data[-100] ^= 0x01  # one flipped bit
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_bundle(None)


# --------------------------------------------------------------------------- weights import
def test_verify_file_against_name_hash_and_explicit_sha(tmp_path: Path) -> None:
    data = b"weights" * 1000
    digest = hashlib.sha256(data).hexdigest()
    named = tmp_path / f"model-{digest[:8]}.pth"
    named.write_bytes(data)
    assert verify_file(named) == digest
    bad = tmp_path / "model-deadbeef.pth"
    bad.write_bytes(data)
    with pytest.raises(WeightsError, match="does not match"):
        verify_file(bad)
    plain = tmp_path / "plain.pth"
    plain.write_bytes(data)
    assert verify_file(plain, digest.upper()) == digest
    for sha in ("", "   ", "xyz", "abc"):
        with pytest.raises(WeightsError, match="hexadecimal"):
            verify_file(plain, sha)


@pytest.mark.skipif(not MOBILENET.is_file(), reason="shared torchvision weights not present")
def test_import_real_torchvision_weights(tmp_path: Path, cli) -> None:
    src = tmp_path / "download" / MOBILENET.name
    src.parent.mkdir()
    shutil.copyfile(MOBILENET, src)
    dest = tmp_path / "cache"
    r = cli("weights", "import", src, "--dest", dest)
    assert r.code == 0, r.err
    assert Path(r.out.strip()) == dest / MOBILENET.name
    assert (dest / MOBILENET.name).read_bytes() == MOBILENET.read_bytes()
    assert _leftovers(dest) == []
    sd = load_state_dict_file(dest / MOBILENET.name)
    assert "features.0.0.weight" in sd


@pytest.mark.skipif(not MOBILENET.is_file(), reason="shared torchvision weights not present")
def test_import_refuses_corrupted_and_unnamed_weights(tmp_path: Path, cli) -> None:
    data = bytearray(MOBILENET.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt = tmp_path / MOBILENET.name
    corrupt.write_bytes(bytes(data))
    dest = tmp_path / "cache"
    r = cli("weights", "import", corrupt, "--dest", dest)
    assert r.code == 1 and len(r.err_lines) == 1 and "does not match" in r.err
    assert not dest.exists() or list(dest.iterdir()) == []

    unnamed = tmp_path / "mobilenet.pth"
    shutil.copyfile(MOBILENET, unnamed)
    r = cli("weights", "import", unnamed, "--dest", dest)
    assert r.code == 1 and "no hash in the file name" in r.err
    r = cli("weights", "import", unnamed, "--dest", dest, "--sha256", "")
    assert r.code == 1 and "hexadecimal" in r.err
    r = cli("weights", "import", unnamed, "--dest", dest, "--sha256", "0" * 64)
    assert r.code == 1 and "does not match" in r.err
    assert not (dest / "mobilenet.pth").exists()
    digest = hashlib.sha256(MOBILENET.read_bytes()).hexdigest()
    r = cli("weights", "import", unnamed, "--dest", dest, "--sha256", digest)
    assert r.code == 0 and (dest / "mobilenet.pth").read_bytes() == MOBILENET.read_bytes()
    assert _leftovers(dest) == []


def test_import_refuses_hash_matching_file_that_is_not_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    f = tmp_path / "evil.pth"
    torch.save({"w": _Payload(marker)}, f)
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    with pytest.raises(WeightsError, match="not a safe weights-only"):
        import_weights(f, sha256=digest, dest_dir=tmp_path / "cache")
    assert not marker.exists()
    assert not (tmp_path / "cache" / "evil.pth").exists() and _leftovers(tmp_path / "cache") == []


# --------------------------------------------------------------------------- atomic writes
def test_exception_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    f = tmp_path / "report.json"
    atomic_write_text(f, "old complete content\n")
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_open(f, "w") as fh:
                fh.write("new half-writ")
                raise exc
        assert f.read_text() == "old complete content\n"
        assert _leftovers(tmp_path) == []
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "plot.png") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("matplotlib failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def _bundle(w: torch.Tensor, **provenance: object) -> ModelBundle:
    return ModelBundle(arch="seed_cnn", preprocessing=get_spec("seed_cnn").preprocessing(64), state_dict={"w": w}, provenance=provenance)


def test_checkpoint_save_failure_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "last.pt"
    save_bundle(_bundle(torch.ones(3)), f)
    before = f.read_bytes()
    # 1) the object fails to serialise after a large tensor has been written
    with pytest.raises(Exception):
        save_bundle(_bundle(torch.zeros(1_000_000), bad=lambda: 0), f)
    assert f.read_bytes() == before and _leftovers(tmp_path) == []
    # 2) the disk fills up at the end of the write
    import pneumoscan.utils.io as uio

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(uio.os, "fsync", full)
    with pytest.raises(CheckpointError, match="No space left"):
        save_bundle(_bundle(torch.zeros(10)), f)
    monkeypatch.undo()
    assert f.read_bytes() == before and _leftovers(tmp_path) == []
    assert torch.equal(load_bundle(f).state_dict["w"], torch.ones(3))


def test_sigkill_mid_write_keeps_old_file(tmp_path: Path) -> None:
    f = tmp_path / "best.pt"
    atomic_write_bytes(f, b"old" * 1000)
    script = textwrap.dedent(f"""
        import importlib.util, time
        spec = importlib.util.spec_from_file_location("uio", {str(REPO / "src" / "pneumoscan" / "utils" / "io.py")!r})
        uio = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(uio)  # stdlib only: no torch import, so the test is quick
        atomic_open = uio.atomic_open
        with atomic_open({str(f)!r}, "wb") as fh:
            fh.write(b"new" * 100000)
            fh.flush()
            print("writing", flush=True)
            time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "writing"
        assert len(_leftovers(tmp_path)) == 1  # the temporary file is being written
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert f.read_bytes() == b"old" * 1000


def test_atomic_files_get_normal_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    import pneumoscan.utils.io as uio

    f = tmp_path / "new.txt"
    atomic_write_text(f, "x")
    assert (f.stat().st_mode & 0o777) == (0o666 & ~uio._UMASK)  # like open(), not mkstemp's 0600
    os.chmod(f, 0o640)
    atomic_write_text(f, "y")
    assert (f.stat().st_mode & 0o777) == 0o640  # replacing a file keeps its permissions
    with atomic_path(tmp_path / "plot.png") as tmp:
        assert tmp.suffix == ".png"  # writers that infer the format from the name still can
        tmp.write_bytes(b"png")
    assert ((tmp_path / "plot.png").stat().st_mode & 0o777) == (0o666 & ~uio._UMASK)
    atomic_save_torch({"a": torch.ones(1)}, tmp_path / "t.pt")
    assert torch.load(tmp_path / "t.pt", weights_only=True)["a"].item() == 1.0


def test_atomic_open_rejects_append_and_read_modes(tmp_path: Path) -> None:
    for mode in ("a", "r", "r+", "ab"):
        with pytest.raises(ValueError):
            with atomic_open(tmp_path / "x", mode):
                pass
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- static check
_WRITERS = {"write_text", "write_bytes", "savefig", "to_csv", "to_json"}
_MODULE_WRITERS = {("torch", "save"), ("onnx", "save"), ("np", "save"), ("numpy", "save"), ("np", "savez")}
_SAFE_CONTEXTS = {"atomic_path", "atomic_open", "TemporaryDirectory", "NamedTemporaryFile"}


def _unsafe_writes(tree: ast.AST) -> list[int]:
    """Line numbers of file writes outside an ``atomic_path``/``atomic_open``/temporary-dir block."""
    found: list[int] = []

    def ctx_name(item: ast.withitem) -> str:
        call = item.context_expr
        f = call.func if isinstance(call, ast.Call) else call
        return getattr(f, "attr", None) or getattr(f, "id", "")

    def visit(node: ast.AST, safe: bool) -> None:
        if isinstance(node, (ast.With, ast.AsyncWith)):
            safe = safe or any(ctx_name(i) in _SAFE_CONTEXTS for i in node.items)
        if isinstance(node, ast.Call) and not safe:
            f = node.func
            if isinstance(f, ast.Name) and f.id == "open" and len(node.args) >= 2:
                mode = node.args[1]
                path = node.args[0]
                if isinstance(mode, ast.Constant) and set(str(mode.value)) & set("wax"):
                    if not (isinstance(path, ast.Constant) and str(path.value).startswith("/proc/")):
                        found.append(node.lineno)
            elif isinstance(f, ast.Attribute):
                owner = f.value.id if isinstance(f.value, ast.Name) else None
                if f.attr in _WRITERS or (owner, f.attr) in _MODULE_WRITERS:
                    target = node.args[1] if (owner, f.attr) in _MODULE_WRITERS and len(node.args) > 1 else (node.args[0] if node.args else None)
                    in_memory = isinstance(target, ast.Name) and target.id in {"buf", "buffer", "fh", "f", "bio"}
                    if not in_memory:
                        found.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, safe)

    visit(tree, False)
    return found


def test_package_writes_files_only_atomically() -> None:
    """No module of the package writes a file except through pneumoscan.utils.io (or inside
    an atomic_path/atomic_open block): every checkpoint, report and export is all or nothing."""
    offenders = []
    for py in sorted((REPO / "src" / "pneumoscan").rglob("*.py")):
        if py.name == "io.py" and py.parent.name == "utils":
            continue
        for line in _unsafe_writes(ast.parse(py.read_text(encoding="utf-8"))):
            offenders.append(f"{py.relative_to(REPO)}:{line}")
    assert offenders == [], "non-atomic file writes:\n" + "\n".join(offenders)


def test_static_check_catches_a_plain_write() -> None:
    bad = ast.parse("def f(p):\n    open(p, 'w').write('x')\n    p.write_text('y')\n    torch.save(obj, p)\n")
    good = ast.parse("def f(p):\n    with atomic_path(p) as t:\n        t.write_text('y')\n    torch.save(obj, buf)\n")
    assert _unsafe_writes(bad) == [2, 3, 4] and _unsafe_writes(good) == []
