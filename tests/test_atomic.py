"""Atomic outputs: whole or absent, never half-written."""

from __future__ import annotations

import pytest

from neuroimagen.atomic import atomic_dir, atomic_path, write_text
from neuroimagen.errors import OutputError


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "x.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_survives_a_failed_rewrite(tmp_path):
    target = write_text(tmp_path / "x.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("new, half")
            raise RuntimeError
    assert target.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_failed_dir_leaves_nothing(tmp_path):
    with pytest.raises(KeyError):
        with atomic_dir(tmp_path / "d") as stage:
            (stage / "a").write_text("1")
            raise KeyError
    assert list(tmp_path.iterdir()) == []


def test_dir_replaces_only_when_allowed(tmp_path):
    with atomic_dir(tmp_path / "d") as stage:
        (stage / "a").write_text("1")
    assert (tmp_path / "d" / "a").read_text() == "1"
    with pytest.raises(OutputError, match="not empty"):
        with atomic_dir(tmp_path / "d"):
            pass
    with atomic_dir(tmp_path / "d", overwrite=True) as stage:
        (stage / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_unwritable_parent(tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=r"cannot write"):
        write_text(blocker / "sub" / "x.txt", "y")
