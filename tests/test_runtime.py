"""The allocator settings the CLI applies at start-up (``pneumoscan.utils.runtime``): a 16 MB
block comes from the heap instead of ``mmap`` once tuned, glibc's defaults stay with
``PNEUMOSCAN_MALLOC=system`` or when the user set glibc's own variables. The decoding workers
tune theirs with lower thresholds: image-sized blocks from the heap, a 16 MB one still mapped
(that the workers apply them: ``tests/test_decode_workers.py``)."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_SRC = Path(__file__).resolve().parents[1] / "src"

try:
    ctypes.CDLL(None).mallinfo2  # glibc >= 2.33
    HAVE_GLIBC = sys.platform.startswith("linux")
except (OSError, AttributeError):
    HAVE_GLIBC = False

pytestmark = pytest.mark.skipif(not HAVE_GLIBC, reason="glibc only")

#: Environment variables by which a user chooses the allocator settings (then left alone).
USER_SETTINGS = ("PNEUMOSCAN_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")

PROBE = """
import ctypes, os
from pneumoscan.utils.runtime import malloc_setting, tune_malloc
setting = tune_malloc(*[int(v) for v in os.environ.get("PROBE_THRESHOLDS", "").split()])
size = int(os.environ.get("PROBE_BLOCK", 16 << 20))
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
before = libc.mallinfo2().hblkhd
block = libc.malloc(size)
mapped = libc.mallinfo2().hblkhd - before >= size
libc.free(block)
print(setting, "|", malloc_setting(), "|", "mmap" if mapped else "heap")
"""


def _probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "PNEUMOSCAN_MALLOC", "LD_PRELOAD")}
    p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60,
                       env={**clean, "PYTHONPATH": str(REPO_SRC), **env})
    assert p.returncode == 0, p.stderr
    return [s.strip() for s in p.stdout.split("|")]


def test_tuned_allocator_keeps_big_blocks_in_the_heap() -> None:
    assert _probe() == ["tuned", "tuned", "heap"]


def test_system_allocator_on_request() -> None:
    assert _probe(PNEUMOSCAN_MALLOC="system") == ["system (PNEUMOSCAN_MALLOC)", "system (PNEUMOSCAN_MALLOC)", "mmap"]
    got = _probe(MALLOC_TRIM_THRESHOLD_="131072")
    assert got[0] == "system (MALLOC_TRIM_THRESHOLD_ set)"


def test_worker_thresholds_keep_image_buffers_in_the_heap_and_map_big_blocks() -> None:
    from pneumoscan.utils.runtime import WORKER_MMAP_THRESHOLD, WORKER_TRIM_THRESHOLD

    worker = f"{WORKER_MMAP_THRESHOLD} {WORKER_TRIM_THRESHOLD}"
    assert _probe(PROBE_THRESHOLDS=worker, PROBE_BLOCK=str(1 << 20)) == ["tuned", "tuned", "heap"]
    assert _probe(PROBE_THRESHOLDS=worker, PROBE_BLOCK=str(16 << 20)) == ["tuned", "tuned", "mmap"]
    # glibc's defaults: a fresh 1 MB block is mapped
    assert _probe(PNEUMOSCAN_MALLOC="system", PROBE_BLOCK=str(1 << 20))[2] == "mmap"


def test_cli_applies_it(cli) -> None:
    from pneumoscan.utils.runtime import malloc_setting

    assert cli("models", "--json").code == 0
    user_chose = any(k in os.environ for k in USER_SETTINGS)
    assert malloc_setting() == "tuned" or (user_chose and malloc_setting().startswith("system ("))
