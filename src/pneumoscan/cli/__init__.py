"""The ``pneumoscan`` command: a thin layer over the Python API.

One module per command group adds its sub-commands through ``register(subparsers)``
(:data:`COMMAND_MODULES`, in the order ``pneumoscan --help`` lists them). Errors on bad input
become one line on stderr and a non-zero exit code; ``--debug`` shows tracebacks. A failed
file operation (full disk, read-only folder, ...) is one line with the path and the reason.
Text that comes from the data (file names, DICOM attributes, decoder messages) is passed to
the log as arguments and printed escaped (:func:`pneumoscan.utils.text.safe_text`): a file
name cannot start a new log line or send escape codes to the terminal.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Callable, Sequence

from .. import __version__
from ..errors import PneumoscanError
from ..utils.io import os_error_reason
from ..utils.runtime import tune_malloc
from ..utils.text import safe_text
from .suggest import SuggestingParser

log = logging.getLogger("pneumoscan")

#: Modules whose ``register(subparsers)`` adds sub-commands, in help order.
COMMAND_MODULES: tuple[str, ...] = (
    "models", "data", "train", "weights", "serve", "evaluate", "bench", "predict", "export", "guard", "ensemble",
)

EXIT_ERROR, EXIT_USAGE = 1, 2

#: The longest a single log argument is printed (file paths fit).
LOG_ARG_LIMIT = 1024
#: The file name an OSError carries when standard output could not be written.
STDOUT_NAME = "<standard output>"


class SafeFormatter(logging.Formatter):
    """Formats records with their string arguments escaped by :func:`safe_text`.

    The format string is the program's own text and keeps its layout; the arguments (file
    names, exception messages, DICOM attributes) come from the data and are shown on one line
    without control characters or terminal escape sequences.
    """

    def format(self, record: logging.LogRecord) -> str:
        args = record.args
        if isinstance(args, tuple) and args:
            record = logging.makeLogRecord(record.__dict__)
            record.args = tuple(
                a if isinstance(a, (int, float)) else safe_text(a, LOG_ARG_LIMIT) if isinstance(a, (str, os.PathLike, BaseException)) else a
                for a in args
            )
        return super().format(record)


#: Optional dependencies: top-level module → (what to call it, the extra that installs it).
#: A command that imports one that is missing says so in one line (exit 2).
OPTIONAL_MODULES: dict[str, tuple[str, str]] = {
    "torch": ("PyTorch", "train"), "torchvision": ("PyTorch", "train"),
    "sklearn": ("scikit-learn", "eval"), "matplotlib": ("matplotlib", "eval"), "jinja2": ("Jinja2", "eval"),
    "onnx": ("onnx", "onnx"), "onnxscript": ("onnxscript", "onnx"), "skimage": ("scikit-image", "guard"),
    "fastapi": ("FastAPI", "serve"), "fastapi_offline": ("fastapi-offline", "serve"), "uvicorn": ("uvicorn", "serve"),
    "multipart": ("python-multipart", "serve"), "python_multipart": ("python-multipart", "serve"),
}


def missing_dependency(e: ImportError) -> str | None:
    """The one-line install hint for an optional dependency a command could not import
    (``this command needs PyTorch: pip install 'pneumoscan[train]'``), or ``None`` when the
    missing module is not one of :data:`OPTIONAL_MODULES` (a real bug).

    Args:
        e: the import error.
    """
    known = OPTIONAL_MODULES.get((getattr(e, "name", None) or "").split(".")[0])
    return None if known is None else f"this command needs {known[0]}: pip install 'pneumoscan[{known[1]}]'"


def setup_logging(verbosity: int = 0) -> None:
    """Log to stderr: INFO by default, DEBUG with -v, WARNING with -q. Only rank 0 of a
    torchrun job logs at INFO.

    Args:
        verbosity: -1 for ``--quiet``, else the number of ``-v`` flags.
    """
    level = logging.INFO - 10 * verbosity if verbosity >= 0 else logging.WARNING
    if int(os.environ.get("RANK", "0")) != 0:
        level = max(level, logging.WARNING)
    root = logging.getLogger("pneumoscan")
    root.setLevel(level)
    for old in [h for h in root.handlers if getattr(h, "_pneumoscan", False)]:
        old.setLevel(level)
    if not any(getattr(h, "_pneumoscan", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setLevel(level)  # the stderr verbosity lives on the handler: train.log still gets INFO
        h.setFormatter(SafeFormatter("%(message)s" if verbosity <= 0 else "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        h._pneumoscan = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.propagate = False


def build_parser() -> argparse.ArgumentParser:
    """The ``pneumoscan`` argument parser with every sub-command registered."""
    parser = SuggestingParser(prog="pneumoscan", description="Pneumonia detection on chest X-rays.")
    parser.add_argument("--version", action="version", version=f"pneumoscan {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{mod}").register(sub)
    return parser


#: Sub-commands that decode in worker processes by default: their forkserver starts before the
#: parser imports the command modules.
DECODING_COMMANDS = ("predict",)


def _early_start(argv: Sequence[str]) -> None:
    """Start the decoding workers' forkserver now when the command will decode images in them
    (``predict``, unless told not to), so that the server's imports run on another core while
    this process imports the rest and loads the model."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in DECODING_COMMANDS or any(a in ("-h", "--help", "--decode-timeout=0") for a in argv):
        return
    if any(a == "--decode-timeout" and b in ("0", "0.0") for a, b in zip(argv, argv[1:])):
        return
    from ..data.forkserver import start_forkserver

    start_forkserver()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pneumoscan`` console script.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 1 on an error, 2 on a usage error or a missing optional
        dependency (one line naming the extra to install), 130 when interrupted.
    """
    _early_start(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(-1 if args.quiet else args.verbose)
    tune_malloc()  # before PyTorch allocates anything (see pneumoscan.utils.runtime)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(func(args) or 0)
    except PneumoscanError as e:
        if args.debug:
            log.exception("error")
        log.error("error: %s", e)
        return EXIT_ERROR
    except ImportError as e:
        hint = missing_dependency(e)
        if args.debug:
            log.exception("import error")
        if hint is None:
            log.error("internal error: %s: %s (rerun with --debug for details)", e.__class__.__name__, e)
            return EXIT_ERROR
        log.error("%s", hint)
        return EXIT_USAGE
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_ERROR
    except OSError as e:  # a file that could not be written or read: the path and the reason
        if args.debug:
            log.exception("error")
        if e.filename == STDOUT_NAME:
            _discard_stdout()
        log.error("error: %s", os_error_reason(e))
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - last line of defence: one line, not a traceback
        if args.debug:
            log.exception("internal error")
        log.error("internal error: %s: %s (rerun with --debug for details)", e.__class__.__name__, e)
        return EXIT_ERROR


def _discard_stdout() -> None:
    """Point standard output at the null device, so that the interpreter's final flush of
    what could not be written adds no second error message."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # pytest's capture has no file descriptor
        pass
