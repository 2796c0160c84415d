"""``heap.trim`` gives the freed heap back on glibc, and is harmless elsewhere."""

from __future__ import annotations

import platform

import numpy as np

from qmpass import heap


def _anon_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon"))


def test_trim_returns_freed_heap_pages() -> None:
    heap.trim()
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return  # nothing to give back through malloc_trim: it must just not fail
    assert heap._libc() is not None
    # many arrays under glibc's mmap threshold (128 KB at first), freed but for the last
    # one, which pins the heap's top so the freed pages below it stay in the heap
    arrays = [np.ones(12_000) for _ in range(4000)]  # 96 KB each, 384 MB in all
    last = arrays[-1]
    del arrays
    before = _anon_kb()
    heap.trim()
    assert _anon_kb() < before - 100_000  # at least 100 MB of the 384 went back
    assert last.sum() == 12_000
