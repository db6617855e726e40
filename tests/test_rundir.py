"""Folders neuroimagen owns: ``--overwrite`` replaces only what the tool wrote; one writer per run directory.

* a folder the tool did not write (a thesis, a home directory) is never deleted, emptied or written into,
  whatever the flags: one error line, exit 2, every file and symlink left as it was;
* a folder the tool wrote (the ``.neuroimagen`` marker, or what the previous release always left) is
  replaced by ``--overwrite``;
* a second command on a run in use exits 2 naming the first one's pid, and the first finishes unharmed;
  a lock file left by a killed command does not block the next one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_one_line_error
from neuroimagen.errors import OutputError
from neuroimagen.rundir import LOCK, MARKER, check_target, hold, kind_of, read_holder, start_fresh

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
    ["train", "--out", "{f}", "--stages", "encoder"],
    ["ablation", "--out", "{f}"],
    ["tune", "--space", REPO / "tune_spaces" / "gan.yaml", "--out", "{f}"],
    ["reconstruct", "--run", "{f}", "--config", REPO / "configs" / "quick.yaml"],
    ["evaluate", "--run", "{f}"],
    ["report", "{f}"],
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


# ----------------------------------------------------------------------------------------------
# One writer per run directory


def _train_args(twin, out, epochs):
    sets = [f"data.eeg={twin / 'eeg_5_95_std.pth'}", f"data.splits={twin / 'block_splits_by_image_all.pth'}",
            f"data.images={twin / 'images'}", "data.window=[20,120]", "train.backend=local", "train.progress=false",
            "train.threads_per_worker=1",  # one thread: on a busy 2-core machine more threads spin and wait
            f"stages.encoder.epochs={epochs}", "stages.encoder.embed_dim=16", "stages.encoder.classes_per_batch=3",
            "stages.encoder.samples_per_class=3"]
    return ["train", "--out", str(out), "--stages", "encoder"] + [a for s in sets for a in ("--set", s)]


def _start(args) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen([sys.executable, "-m", "neuroimagen.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_until_held(proc: subprocess.Popen, run: Path, timeout: float = 60.0) -> None:
    """Until ``run/.lock`` names ``proc`` and its config.yaml is written (the run is then non-empty)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        holder = read_holder(run)
        if holder and holder["pid"] == proc.pid and (run / "config.yaml").is_file():
            return
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"{run}: the first command never took the lock")


def test_a_second_command_on_a_run_in_use_exits_2_naming_the_first(twin, tmp_path, run_cli):
    run = tmp_path / "q"
    first = _start(_train_args(twin, run, epochs=3))
    try:
        _wait_until_held(first, run)
        first.send_signal(signal.SIGSTOP)  # it keeps its lock while stopped: no race with the checks below
        before = snapshot(run)
        msg = [f"{run}: in use by pid {first.pid} (neuroimagen train, since ", "wait for it or choose another --out"]
        assert_one_line_error(run_cli(*_train_args(twin, run, epochs=1)), *msg)
        assert_one_line_error(run_cli("demo", "--quick", "--out", run, "--overwrite"), *msg)  # no deleting a live run
        assert_one_line_error(run_cli("evaluate", "--run", run), *msg)
        assert_one_line_error(run_cli("report", run), *msg)
        job = subprocess.run([sys.executable, "jobs/train.py", "--out", str(run), "--stages", "encoder"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)  # the Ray job script, same lock
        lines = [ln for ln in job.stderr.splitlines() if ln.strip()]
        assert job.returncode == 2 and len(lines) == 1 and all(m in lines[0] for m in msg), job.stderr
        assert snapshot(run) == before  # the refused commands touched nothing
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=90)
    assert first.returncode == 0, err[-3000:]
    assert "[encoder] done" in err
    record = json.loads((run / "run.json").read_text())
    assert record["stages"]["encoder"]["model"] == "encoder/model"
    prov = record["stages"]["encoder"]["provenance"]  # what the stage ran on is recorded with it
    assert prov["packages"]["torch"] == torch.__version__.split("+")[0] and prov["cpu_count"] == os.cpu_count()
    assert (run / "encoder" / "model" / "model.json").is_file()
    assert [h["epoch"] for h in json.loads((run / "encoder" / "history.json").read_text())] == [0, 1, 2]
    assert read_holder(run) is None  # released on exit: the lock file names nobody
    assert json.loads((run / MARKER).read_text())["written_by"] == "neuroimagen train"


def test_a_lock_left_by_a_killed_command_does_not_block(twin, tmp_path, run_cli):
    run = tmp_path / "q"
    first = _start(_train_args(twin, run, epochs=3))
    try:
        _wait_until_held(first, run)
    finally:
        first.kill()  # SIGKILL: no cleanup runs
    first.wait(timeout=30)
    assert read_holder(run)["pid"] == first.pid  # the stale file still names the dead holder
    res = run_cli(*_train_args(twin, run, epochs=1))
    assert res.code == 0, res
    assert "encoder" in json.loads((run / "run.json").read_text())["stages"]
    assert read_holder(run) is None


def test_hold_is_exclusive_and_released_on_exit(tmp_path):
    run = tmp_path / "r"
    start_fresh(run, "run", "neuroimagen train")
    (run / "run.json").write_text('{"stages": {}}')
    (run / LOCK).write_text(json.dumps({"pid": 999999, "command": "neuroimagen train", "since": "2020-01-01T00:00:00Z"}))
    with hold(run, "neuroimagen train"):  # a lock file without a live holder blocks nothing
        assert read_holder(run)["pid"] == os.getpid()
        assert kind_of(run) == "run"
        with pytest.raises(OutputError, match=f"in use by pid {os.getpid()} \\(neuroimagen train, since "):
            with hold(run, "neuroimagen evaluate", create=False):
                pass
    assert read_holder(run) is None
    with hold(run, "neuroimagen report", create=False):
        assert read_holder(run)["command"] == "neuroimagen report"
    with pytest.raises(RuntimeError):
        with hold(run, "neuroimagen train"):
            raise RuntimeError("crash")
    with hold(run, "neuroimagen train"):  # an exception released it too
        pass


def test_every_folder_a_command_creates_is_marked(tmp_path):
    for kind, command in (("run", "neuroimagen train"), ("sweep", "neuroimagen tune")):
        with hold(tmp_path / kind, command, kind=kind):
            pass
        doc = json.loads((tmp_path / kind / MARKER).read_text())
        assert kind_of(tmp_path / kind) == kind and doc["written_by"] == command and doc["created"].endswith("Z")
    with hold(tmp_path / "missing", "neuroimagen evaluate", create=False):  # a reader's missing run: not created
        pass
    assert not (tmp_path / "missing").exists()
