"""How the decoding worker processes run (:mod:`pneumoscan.data.decode_pool`): at a lower CPU
priority than their caller (``PNEUMOSCAN_DECODE_NICE`` overrides it, 0 keeps the caller's), with
their allocator tuned (``pneumoscan.utils.runtime``)."""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import pytest

from pneumoscan.data.decode_pool import DECODE_NICE, DECODE_NICE_ENV, DecodePool, decode_nice
from pneumoscan.data.isolated import decode_isolated

try:
    ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018 - glibc only
    HAVE_GLIBC = sys.platform.startswith("linux")
except (OSError, AttributeError):
    HAVE_GLIBC = False
#: Environment variables by which a user chooses the allocator settings (then left alone).
USER_SETTINGS = ("PNEUMOSCAN_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def _film(fixtures_dir: Path) -> Path:
    return fixtures_dir / "fullres" / "NORMAL2-IM-1438-0001.jpeg"


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="POSIX process priorities")
@pytest.mark.parametrize(("value", "added"), [(None, DECODE_NICE), ("0", 0), ("3", 3), ("40", 19), ("-4", 0), ("high", DECODE_NICE)])
def test_workers_run_at_a_lower_priority(fresh_pool: DecodePool, fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                         value: str | None, added: int) -> None:
    if value is None:
        monkeypatch.delenv(DECODE_NICE_ENV, raising=False)
    else:
        monkeypatch.setenv(DECODE_NICE_ENV, value)
    assert decode_nice() == added
    arr, _ = decode_isolated(_film(fixtures_dir), max_side=224)
    assert arr.ndim == 2
    (pid,) = fresh_pool.pids()
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + added)


@pytest.mark.skipif(not HAVE_GLIBC, reason="glibc only")
def test_workers_tune_their_allocator(fresh_pool: DecodePool, fixtures_dir: Path) -> None:
    decode_isolated(_film(fixtures_dir), max_side=224)
    got = fresh_pool.allocators()
    user_chose = any(k in os.environ for k in USER_SETTINGS)
    assert got == ["tuned"] or (user_chose and len(got) == 1 and got[0].startswith("system (")), got
