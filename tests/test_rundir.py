"""Folders neuroimagen owns: ``--overwrite`` replaces only what the tool wrote.

* a folder the tool did not write (a thesis, a home directory) is never deleted or emptied, with or
  without ``--overwrite``: one error line, exit 2, every file and symlink left as it was;
* a folder the tool wrote (the ``.neuroimagen`` marker, or what the previous release always left) is
  replaced by ``--overwrite``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import assert_one_line_error
from neuroimagen.errors import OutputError
from neuroimagen.rundir import MARKER, check_target, kind_of, start_fresh

SYNTH = ["--classes", 2, "--images-per-class", 10, "--subjects", 1, "--channels", 4, "--image-size", 16, "--quiet"]


def snapshot(root: Path) -> dict:
    """Every entry under ``root`` (not following links): file bytes, link targets, folders."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", p.read_bytes())
    return out


@pytest.fixture
def thesis(tmp_path):
    """A user's folder: a thesis, a subfolder, and symlinks to a folder and a file outside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.csv").write_text("1,2,3\n")
    folder = tmp_path / "thesis"
    (folder / "figures").mkdir(parents=True)
    (folder / "thesis.tex").write_text("\\documentclass{book}\n")
    (folder / "figures" / "fig1.pdf").write_bytes(b"%PDF-1.4 ...")
    (folder / "data").symlink_to(outside, target_is_directory=True)
    (folder / "data.csv").symlink_to(outside / "data.csv")
    return folder, snapshot(folder), snapshot(outside)


@pytest.mark.parametrize("args", [
    ["data", "synth", "{f}", "--overwrite", *SYNTH],
    ["data", "synth", "{f}", *SYNTH],
    ["demo", "--quick", "--out", "{f}", "--overwrite"],
    ["demo", "--quick", "--out", "{f}"],
], ids=lambda a: " ".join(str(x) for x in a[:2] if not str(x).startswith("{")) + (" --overwrite" if "--overwrite" in a else ""))
def test_a_folder_neuroimagen_did_not_write_is_left_exactly_as_it_was(thesis, run_cli, args):
    folder, before, outside_before = thesis
    res = run_cli(*[str(a).format(f=folder) for a in args])
    frags = ["not written by neuroimagen", f"no {MARKER} marker"]
    if "--overwrite" in args:
        frags += ["refusing to overwrite", "remove it yourself"]
    assert_one_line_error(res, str(folder), *frags)
    assert snapshot(folder) == before  # no file deleted, changed or added (not even a lock file)
    assert snapshot(folder.parent / "outside") == outside_before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["outside", "thesis"]  # no staging sibling


def test_overwrite_replaces_a_twin_neuroimagen_wrote(tmp_path, run_cli):
    out = tmp_path / "twin"
    assert run_cli("data", "synth", out, *SYNTH).code == 0
    assert json.loads((out / MARKER).read_text())["kind"] == "twin" and kind_of(out) == "twin"
    assert_one_line_error(run_cli("data", "synth", out, *SYNTH), "not empty", "--overwrite")  # never silently
    res = run_cli("data", "synth", out, "--overwrite", *SYNTH[:1], 3, *SYNTH[2:])
    assert res.code == 0, res
    assert json.loads((out / "synth.json").read_text())["classes"] == 3
    # a twin written before the marker existed (the previous release) is recognised by its config.yaml + synth.json
    (out / MARKER).unlink()
    assert kind_of(out) == "twin"
    res = run_cli("data", "synth", out, "--overwrite", *SYNTH)
    assert res.code == 0, res
    assert json.loads((out / "synth.json").read_text())["classes"] == 2 and (out / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["twin"]  # no staging directory left


def test_overwrite_never_replaces_a_folder_of_another_kind(tmp_path, run_cli):
    run = tmp_path / "run"
    start_fresh(run, "run", "neuroimagen train")
    (run / "run.json").write_text('{"stages": {"encoder": {}}}')
    before = snapshot(run)
    assert_one_line_error(run_cli("data", "synth", run, "--overwrite", *SYNTH),
                          "refusing to overwrite", "holds a run directory written by neuroimagen, not a synthetic twin")
    assert snapshot(run) == before


def test_ownership_markers(tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.yaml").write_text("# Resolved neuroimagen config: every default filled in, paths absolute.\n")
    assert kind_of(legacy) is None  # what `data inspect --out` leaves in any folder: proves nothing
    (legacy / "run.json").write_text("{}")
    assert kind_of(legacy) == "run"  # a run directory of the previous release
    (legacy / "encoder").mkdir()
    start_fresh(legacy, "run", "neuroimagen demo", overwrite=True)
    assert sorted(p.name for p in legacy.iterdir()) == [MARKER]
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "notes.txt").write_text("mine")
    (fake / MARKER).symlink_to(legacy / MARKER)  # a symlinked marker is not trusted
    assert kind_of(fake) is None
    with pytest.raises(OutputError, match="refusing to overwrite"):
        check_target(fake, "run", overwrite=True)
    (fake / MARKER).unlink()
    (fake / MARKER).write_text('{"tool": "something else", "kind": "run"}')
    assert kind_of(fake) is None
