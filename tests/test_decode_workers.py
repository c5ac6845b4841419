"""How the decoding worker processes run (:mod:`pneumoscan.data.decode_pool`): at their pool's
priority (the caller's by default, niceness +5 for ``pneumoscan predict``;
``PNEUMOSCAN_DECODE_NICE`` overrides it), with their allocator tuned
(``pneumoscan.utils.runtime``)."""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import pytest

from pneumoscan.data.decode_pool import DECODE_NICE, DECODE_NICE_ENV, DecodePool, decode_nice, default_pool
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


def _niceness(pid: int = 0) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="POSIX process priorities")
@pytest.mark.parametrize(("pool_nice", "value", "added"), [
    (0, None, 0),  # a pool's default (the service's): the caller's priority
    (DECODE_NICE, None, DECODE_NICE),  # what 'pneumoscan predict' asks for
    (DECODE_NICE, "0", 0), (0, "3", 3), (DECODE_NICE, "40", 19), (DECODE_NICE, "-4", 0), (DECODE_NICE, "high", DECODE_NICE),
])
def test_workers_run_at_the_pools_priority(fresh_pool: DecodePool, fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                           pool_nice: int, value: str | None, added: int) -> None:
    if value is None:
        monkeypatch.delenv(DECODE_NICE_ENV, raising=False)
    else:
        monkeypatch.setenv(DECODE_NICE_ENV, value)
    assert decode_nice(pool_nice) == added
    fresh_pool.nice = pool_nice
    arr, _ = decode_isolated(_film(fixtures_dir), max_side=224)
    assert arr.ndim == 2
    (pid,) = fresh_pool.pids()
    assert _niceness(pid) == min(19, _niceness() + added)


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="POSIX process priorities")
def test_predict_starts_its_workers_at_a_lower_priority(fresh_pool: DecodePool, fixtures_dir: Path, cli,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DECODE_NICE_ENV, raising=False)
    assert fresh_pool.pids() == []
    r = cli("predict", _film(fixtures_dir), "--format", "json")
    assert r.code == 0, r.err
    pids = default_pool().pids()
    assert pids and all(_niceness(pid) == min(19, _niceness() + DECODE_NICE) for pid in pids)


@pytest.mark.skipif(not HAVE_GLIBC, reason="glibc only")
def test_workers_tune_their_allocator(fresh_pool: DecodePool, fixtures_dir: Path) -> None:
    decode_isolated(_film(fixtures_dir), max_side=224)
    got = fresh_pool.allocators()
    user_chose = any(k in os.environ for k in USER_SETTINGS)
    assert got == ["tuned"] or (user_chose and len(got) == 1 and got[0].startswith("system (")), got
