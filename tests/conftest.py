"""Shared pytest fixtures for the pneumoscan test suite.

Session-scoped fixtures (usable from every test file):

* ``fixtures_dir`` – ``tests/fixtures``;
* ``xray_dir`` – ``tests/fixtures/xray`` (32 train + 8 val real 224-px Kermany JPEGs);
* ``fullres_dir`` – ``tests/fixtures/fullres`` (2 original-size JPEGs);
* ``shared_dir`` – ``../shared/data`` beside the repository when it exists, else ``None``;
* ``tiny_run`` – a seed_cnn run (2 epochs) trained once per session on ``xray_dir`` through
  ``pneumoscan train``; its directory holds ``best.pt``, ``last.pt``, ``config.yaml``... Treat it
  as read-only (copy it with :func:`shutil.copytree` before changing anything).

Function-scoped helpers:

* ``cli`` – ``cli("train", "--data", ...)`` runs :func:`pneumoscan.cli.main` in-process and
  returns a :class:`CliResult` (exit code, stdout, stderr);
* ``cli_subprocess`` – the same through ``python -m pneumoscan`` in a fresh interpreter (for
  checks that must see exactly what a user sees, e.g. "no traceback").
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

os.environ["MPLBACKEND"] = "Agg"  # before anything imports matplotlib

import pytest  # noqa: E402
import torch  # noqa: E402

if TYPE_CHECKING:
    from pneumoscan.data.decode_pool import DecodePool

torch.set_num_threads(2)

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


@dataclass
class CliResult:
    """What one ``pneumoscan`` invocation produced.

    Attributes:
        code: exit status.
        out: everything written to stdout.
        err: everything written to stderr (log lines, error line).
    """

    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        """Non-empty stderr lines."""
        return [ln for ln in self.err.splitlines() if ln.strip()]


def _drop_cli_log_handlers() -> None:
    """Remove the stderr handler :func:`pneumoscan.cli.setup_logging` installs, so the next
    ``main()`` call binds a fresh one to the stream pytest is capturing now."""
    root = logging.getLogger("pneumoscan")
    for h in list(root.handlers):
        if getattr(h, "_pneumoscan", False):
            root.removeHandler(h)


def run_cli_in_process(argv: list[str]) -> int:
    """Call ``pneumoscan.cli.main(argv)`` and leave no logging handler behind.

    Args:
        argv: the arguments after ``pneumoscan``.

    Returns:
        The exit code.
    """
    from pneumoscan.cli import main

    _drop_cli_log_handlers()
    try:
        return main([str(a) for a in argv])
    finally:
        _drop_cli_log_handlers()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``tests/fixtures``."""
    return TESTS_DIR / "fixtures"


@pytest.fixture(scope="session")
def xray_dir(fixtures_dir: Path) -> Path:
    """``tests/fixtures/xray``: ``{train,val}/{NORMAL,PNEUMONIA}`` of real Kermany images."""
    return fixtures_dir / "xray"


@pytest.fixture(scope="session")
def fullres_dir(fixtures_dir: Path) -> Path:
    """``tests/fixtures/fullres``: two original-size Kermany JPEGs."""
    return fixtures_dir / "fullres"


@pytest.fixture(scope="session")
def shared_dir() -> Path | None:
    """``../shared/data`` beside the repository (the full development data), or ``None``."""
    p = (REPO_ROOT.parent / "shared" / "data").resolve()
    return p if p.is_dir() else None


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, xray_dir: Path) -> Path:
    """A seed_cnn run trained once per session on the fixture images via ``pneumoscan train``
    (2 epochs, batch 8, patient-grouped validation). Returns the run directory."""
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    code = run_cli_in_process([
        "train", "--data", str(xray_dir), "--model", "seed_cnn", "--epochs", "2", "--batch-size", "8",
        "--seed", "0", "--no-progress", "--out", str(out),
    ])
    assert code == 0, f"training the session's tiny run failed (exit {code})"
    return out


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run the ``pneumoscan`` CLI in-process: ``cli("models", "--json")``."""

    def run(*argv: object) -> CliResult:
        capsys.readouterr()
        code = run_cli_in_process([str(a) for a in argv])
        cap = capsys.readouterr()
        return CliResult(code, cap.out, cap.err)

    return run


@pytest.fixture
def cli_subprocess() -> Callable[..., CliResult]:
    """Run ``python -m pneumoscan ARGS`` in a fresh interpreter (no stdin, Agg backend)."""

    def run(*argv: object, timeout: float = 300, cwd: str | Path | None = None) -> CliResult:
        env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
        p = subprocess.run(
            [sys.executable, "-m", "pneumoscan", *[str(a) for a in argv]],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, env=env,
            cwd=str(cwd or REPO_ROOT),
        )
        return CliResult(p.returncode, p.stdout, p.stderr)

    return run


@pytest.fixture()
def fresh_pool() -> Iterator["DecodePool"]:
    """The process-wide decoding pool, restarted empty for the test and stopped after it."""
    from pneumoscan.data.decode_pool import default_pool, shutdown_decode_pool

    shutdown_decode_pool()
    yield default_pool()
    shutdown_decode_pool()
