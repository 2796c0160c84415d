"""Atomic writes: whole files with ordinary permissions, nothing left on failure."""

from __future__ import annotations

import os
import stat

import pytest

from qmpass.modelio import write_atomic


def test_written_file_has_the_permissions_open_would_give(tmp_path) -> None:
    path = tmp_path / "sub" / "report.json"
    write_atomic(path, "{}")
    assert path.read_text() == "{}"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_a_failed_write_leaves_nothing(tmp_path) -> None:
    with pytest.raises(TypeError):
        write_atomic(tmp_path / "x.bin", 42)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
