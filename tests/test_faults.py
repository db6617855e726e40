"""Fault tolerance: nothing lost, nothing half-written trusted.

* a Ray Data generation actor SIGKILLed mid-run: its batches are retried, every row lands exactly once;
* a row delivered twice (at-least-once retries) is written once;
* the whole ablation job SIGKILLed halfway through writing a shard, then rerun: the half-written file is
  never read and is removed, finished shards are reused, the results equal the uninterrupted run's;
* an unwritable output location or a full disk: one clear error line (exit 2) and nothing a later run
  would trust (no ``*.partial-*`` file, no checkpoint, no shard, no report).

A killed Ray Train worker resuming to the uninterrupted run's result is in ``test_distributed.py``; an
interrupted sweep in ``test_tune.py``.

The full disk is the kernel's per-process file size limit (``RLIMIT_FSIZE``, SIGXFSZ ignored), so writes
past the limit fail with EFBIG exactly where a full disk fails with ENOSPC. It needs no privileges (unlike
a small tmpfs mount) and works the same for root, for whom ``chmod`` makes nothing unwritable; an
unwritable directory is a path whose parent is a regular file (ENOTDIR).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, assert_one_line_error
from neuroimagen.config import load_config, override

KEY = ["subject", "variant", "item", "sample"]
ROW_KEY = ["subject", "variant", "stem", "sample"]


def _copy(demo_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(demo_run[0], dst)
    return dst


def _shards(run):
    state = json.loads((run / "results" / "state.json").read_text())
    return run / "results" / "shards" / state["fingerprint"]


def _partials(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.partial-*"))


def _same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Same (subject, variant, item, sample) rows, each exactly once, with the same numbers."""
    assert not a.duplicated(KEY).any() and not a.duplicated(ROW_KEY).any()
    assert len(a) == len(b)
    a, b = a.sort_values(KEY).reset_index(drop=True), b.sort_values(KEY).reset_index(drop=True)
    cols = KEY + ["stem", "seed_z", "seed_noise", "seed_nway", "label", "judge_gt_top1"]
    assert a[cols].equals(b[cols])
    np.testing.assert_allclose(a["ssim"], b["ssim"], atol=2e-4)
    np.testing.assert_allclose(np.stack(a["probs"]), np.stack(b["probs"]), atol=2e-3)


def _cli(args, limit_bytes=None, timeout=600) -> subprocess.CompletedProcess:
    """``neuroimagen ARGS`` in a child process; with ``limit_bytes`` no file it writes may grow past that size."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "neuroimagen.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit if limit_bytes is not None else None)


def _one_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, and exactly one ``neuroimagen: error:`` line: the last one."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("neuroimagen: error: ")]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    for frag in fragments:
        assert frag in errors[0], (frag, errors[0])
    return errors[0]


# ----------------------------------------------------------------------------------------------
# Ray Data: a killed actor's batches are retried


@pytest.mark.slow
def test_a_killed_generation_actor_is_retried_and_every_row_lands_once(demo_run, tmp_path, ray_session):
    from neuroimagen.backends import reconstruct
    from neuroimagen.runs.evaluation import evaluate

    run = _copy(demo_run, tmp_path)
    before = pd.read_parquet(run / "results" / "per_sample.parquet")
    shard_dir = _shards(run)
    for name in ("s1__I.parquet", "s2__L+I.parquet", "s1__other-class.parquet"):
        (shard_dir / name).unlink()
    # 108 rows in 9 batches; the generation actor SIGKILLs itself on its third batch (once: a marker file)
    cfg = override(load_config(run / "config.yaml"), ["train.progress=false", "eval.backend=ray", "eval.batch_size=12",
                                                        "eval.fault_injection_batch=2"])
    info = reconstruct(cfg, run, log=lambda m: None)
    assert (run / "results" / "fault-injected-batch").is_file()  # the actor really died mid-run
    assert info["computed"] == 3 * 36 and info["reused"] == 11
    evaluate(run, log=lambda m: None)
    after = pd.read_parquet(run / "results" / "per_sample.parquet")
    _same_rows(after, before)
    for name in ("s1__I.parquet", "s2__L+I.parquet", "s1__other-class.parquet"):
        shard = pd.read_parquet(shard_dir / name)
        assert len(shard) == 36 and not shard.duplicated(["item", "sample"]).any()
    assert _partials(run) == []


@pytest.mark.slow
def test_rows_delivered_twice_are_written_once(demo_run, tmp_path, monkeypatch):
    """At-least-once delivery (a retried task re-emits rows, even after their shard was written) loses and
    duplicates nothing."""
    import neuroimagen.runs.evaluation as evaluation

    run = _copy(demo_run, tmp_path)
    before = pd.read_parquet(run / "results" / "per_sample.parquet")
    (_shards(run) / "s2__L.parquet").unlink()
    real = evaluation.run_local

    def twice(rows, cfg, sources, on_batch, progress=True):
        def deliver(batch):
            on_batch(batch)
            on_batch({k: v.copy() for k, v in batch.items()})

        real(rows, cfg, sources, deliver, progress)

    monkeypatch.setattr(evaluation, "run_local", twice)
    cfg = override(load_config(run / "config.yaml"), ["train.progress=false", "eval.batch_size=12"])
    info = evaluation.reconstruct(cfg, run, log=lambda m: None)
    assert info["computed"] == 36 and info["reused"] == 13
    evaluation.evaluate(run, log=lambda m: None)
    _same_rows(pd.read_parquet(run / "results" / "per_sample.parquet"), before)


# ----------------------------------------------------------------------------------------------
# The whole job SIGKILLed mid-write, then rerun


@pytest.mark.slow
def test_ablation_killed_mid_write_then_rerun_reuses_finished_shards(demo_run, tmp_path):
    run = _copy(demo_run, tmp_path)
    before = pd.read_parquet(run / "results" / "per_sample.parquet")
    summary_before = pd.read_csv(run / "results" / "summary.csv", dtype={"subject": str})
    shard_dir = _shards(run)
    todo = ["s1__L+I.parquet", "s2__oracle.parquet"]  # in build order: s1 first
    for name in todo:
        (shard_dir / name).unlink()
    (run / "results" / "per_sample.parquet").unlink()
    (run / "results" / "summary.csv").unlink()
    shutil.rmtree(run / "report")
    kept = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("*.parquet")}
    args = ["ablation", "--config", run / "config.yaml", "--out", run, "--set", "eval.backend=local",
            "--set", "train.progress=false", "--set", "eval.fault_injection_shard=1"]

    killed = _cli(args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (run / "results" / "fault-injected-shard").is_file()
    assert (shard_dir / todo[0]).is_file() and not (shard_dir / todo[1]).exists()
    partial = [p for p in shard_dir.iterdir() if p.name.startswith(todo[1] + ".partial-")]
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the half-written shard, under a temporary name
    assert not (run / "results" / "per_sample.parquet").exists()
    first = (shard_dir / todo[0]).stat().st_mtime_ns

    rerun = _cli(args)  # the same command again: the marker keeps the fault from firing twice
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "13 shards already done, 36 images to generate" in rerun.stderr
    assert "removed 1 partial file(s)" in rerun.stderr
    assert (shard_dir / todo[0]).stat().st_mtime_ns == first  # the finished shard was reused, not rewritten
    assert kept == {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("*.parquet") if p.name in kept}
    assert _partials(run) == []
    assert len(pd.read_parquet(shard_dir / todo[1])) == 36
    _same_rows(pd.read_parquet(run / "results" / "per_sample.parquet"), before)
    summary = pd.read_csv(run / "results" / "summary.csv", dtype={"subject": str})
    assert summary[["subject", "variant", "n", "n_eeg", "acc_n"]].equals(summary_before[["subject", "variant", "n", "n_eeg", "acc_n"]])
    for col in ("acc", "acc_max", "is", "ssim", "judge_gt_acc"):
        np.testing.assert_allclose(summary[col], summary_before[col], atol=2e-3, err_msg=col)
    assert (run / "report" / "report.md").is_file() and not list(run.glob("report.partial-*"))


# ----------------------------------------------------------------------------------------------
# Unwritable output, full disk


def test_an_output_under_a_regular_file_is_one_clear_error(tmp_path, run_cli):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory\n")
    assert_one_line_error(run_cli("train", "--out", blocker / "run", "--stages", "encoder"),
                          f"{blocker / 'run'}: cannot create the directory (Not a directory)")
    assert_one_line_error(run_cli("ablation", "--out", blocker / "run"), "cannot create the directory (Not a directory)")
    assert_one_line_error(run_cli("demo", "--quick", "--out", blocker / "demo"), "Not a directory")
    assert_one_line_error(run_cli("data", "synth", blocker / "twin", "--quiet"), str(blocker / "twin"))
    assert blocker.read_text() == "not a directory\n" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.fixture(scope="module")
def font_cache():
    """Build matplotlib's font cache before a child process runs under a file size limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.font_manager  # noqa: F401


@pytest.mark.slow
def test_a_full_disk_while_training_leaves_no_checkpoint(twin, tmp_path, font_cache):
    out = tmp_path / "run"
    sets = [f"data.eeg={twin / 'eeg_5_95_std.pth'}", f"data.splits={twin / 'block_splits_by_image_all.pth'}",
            f"data.images={twin / 'images'}", "train.backend=local", "train.progress=false", "stages.encoder.epochs=1",
            "stages.encoder.embed_dim=16", "stages.encoder.classes_per_batch=3", "stages.encoder.samples_per_class=3"]
    args = ["train", "--out", out, "--stages", "encoder"] + [a for s in sets for a in ("--set", s)]
    proc = _cli(args, limit_bytes=64 * 1024)  # config.yaml (~3 KB) fits; a checkpoint's weights do not
    _one_error(proc, str(out / "checkpoints" / "encoder" / "epoch-0000"), "cannot write", "file too large")
    assert (out / "config.yaml").is_file()
    assert _partials(out) == []
    assert not list((out / "checkpoints" / "encoder").glob("epoch-*"))  # no checkpoint a rerun would resume
    assert not (out / "run.json").exists() and not (out / "encoder").exists()
    # with room again, the same run trains from scratch: nothing from the failed run is trusted
    from neuroimagen.backends import train

    metrics = train(load_config(out / "config.yaml"), out, ["encoder"], log=lambda m: None)["encoder"]
    assert metrics["resumed_at_epochs"] == [] and [h["epoch"] for h in json.loads(
        (out / "encoder" / "history.json").read_text())] == [0]
    assert json.loads((out / "run.json").read_text())["stages"]["encoder"]["model"] == "encoder/model"


@pytest.mark.slow
def test_a_full_disk_while_writing_a_shard_leaves_no_shard(demo_run, tmp_path, font_cache):
    run = _copy(demo_run, tmp_path)
    shard_dir = _shards(run)
    (shard_dir / "s1__other-class.parquet").unlink()
    shutil.rmtree(run / "results" / "images" / "s1" / "other-class")
    limit = 10 * 1024  # state.json (~5 KB) and the 32 px PNGs (~2 KB) fit; a shard of 36 scored rows does not
    assert (run / "results" / "state.json").stat().st_size < limit < (shard_dir / "s2__other-class.parquet").stat().st_size
    proc = _cli(["reconstruct", "--run", run, "--set", "eval.backend=local", "--set", "train.progress=false"],
                limit_bytes=limit)
    assert "13 shards already done, 36 images to generate" in proc.stderr
    _one_error(proc, f"{shard_dir / 's1__other-class.parquet'}: cannot write", "File too large")
    assert not (shard_dir / "s1__other-class.parquet").exists() and _partials(run) == []
    assert len(list((run / "results" / "images" / "s1" / "other-class").glob("*.png"))) == 36 * 2  # whole images only
    # nothing downstream trusts the missing shard
    res = _cli(["evaluate", "--run", run])
    _one_error(res, "s1__other-class.parquet: missing or incomplete")


@pytest.mark.slow
def test_a_full_disk_while_evaluating_and_reporting_leaves_the_previous_files(demo_run, tmp_path, font_cache):
    run = _copy(demo_run, tmp_path)
    results = run / "results"
    (results / "per_sample.parquet").unlink()
    (results / "summary.csv").unlink()
    proc = _cli(["evaluate", "--run", run], limit_bytes=16 * 1024)
    _one_error(proc, f"{results / 'per_sample.parquet'}: cannot write", "File too large")
    assert not (results / "per_sample.parquet").exists() and not (results / "summary.csv").exists()
    assert _partials(run) == []

    run2 = _copy(demo_run, tmp_path / "second")
    report = run2 / "report"
    old = {p.name: p.read_bytes() for p in report.iterdir()}
    proc = _cli(["report", run2], limit_bytes=16 * 1024)
    _one_error(proc, f"{report / 'per_subject.png'}: cannot write (File too large)")
    assert {p.name: p.read_bytes() for p in report.iterdir()} == old  # the previous report, whole and unchanged
    assert _partials(run2) == [] and not list(run2.glob("report.partial-*"))


def test_a_checkpoint_copy_cut_short_is_never_trusted(tmp_path):
    """meta.json lists every file with its size: a checkpoint whose weights were cut short (a killed copy to
    shared storage) is skipped on resume, by the local reporter and by the Ray storage scan alike."""
    import torch

    from neuroimagen.distributed.train import latest_stored
    from neuroimagen.errors import DataError
    from neuroimagen.training.checkpoint import load_checkpoint, save_checkpoint
    from neuroimagen.training.loop import LocalReporter

    def payload(epoch):
        return {"meta": {"stage": "encoder", "epoch": epoch}, "modules": {"encoder": {"w": torch.full((64, 64), float(epoch))}},
                "optimizers": {}, "best": {}}

    for root, names in ((tmp_path / "ray", ("checkpoint_000000", "checkpoint_000001")),
                        (tmp_path / "local", ("epoch-0000", "epoch-0001"))):
        for epoch, name in enumerate(names):
            save_checkpoint(root / name, payload(epoch))
        weights = root / names[1] / "module-encoder.pt"
        weights.write_bytes(weights.read_bytes()[:100])  # the newest copy was cut short after its meta.json arrived
        with pytest.raises(DataError, match=r"incomplete checkpoint \(module-encoder.pt has 100 bytes"):
            load_checkpoint(root / names[1])
    assert latest_stored(tmp_path / "ray").name == "checkpoint_000000"
    restored = LocalReporter(tmp_path / "local").restore()
    assert restored["meta"]["epoch"] == 0 and float(restored["modules"]["encoder"]["w"][0, 0]) == 0.0
    (tmp_path / "ray" / "checkpoint_000000" / "module-encoder.pt").unlink()
    assert latest_stored(tmp_path / "ray") is None  # nothing whole left: start from scratch
