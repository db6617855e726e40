"""Messages: the library logs and never prints; the CLI shows concise lines (-v / -q) and writes every command's
full log into the run; without a terminal, long work logs a progress line with an ETA at a steady interval."""

from __future__ import annotations

import logging
import re

import pytest

from neuroimagen.config import load_config
from neuroimagen.logs import Progress, configure_cli, get_logger, progress


def _sets(twin, progress_on: bool) -> list[str]:
    return ["train.backend=local", f"train.progress={'true' if progress_on else 'false'}",
            f"data.eeg={twin / 'eeg_5_95_std.pth'}", f"data.splits={twin / 'block_splits_by_image_all.pth'}",
            f"data.images={twin / 'images'}", "stages.encoder.epochs=1", "stages.encoder.embed_dim=16",
            "stages.encoder.classes_per_batch=3", "stages.encoder.samples_per_class=3"]


@pytest.fixture
def clean_root():
    """The package's root logger as a library user finds it: no handlers (the CLI tests attach some)."""
    root = logging.getLogger("neuroimagen")
    saved = root.handlers[:], root.level
    root.handlers[:] = []
    root.setLevel(logging.NOTSET)
    yield root
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_the_library_prints_nothing_and_a_notebook_routes_its_messages(twin, tmp_path, capsys, clean_root):
    from neuroimagen.runs.training import train

    capsys.readouterr()
    train(load_config(None, _sets(twin, True)), tmp_path / "a", ["encoder"])
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == ""  # per-epoch lines and the summary went to logging only

    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    clean_root.addHandler(Keep())
    clean_root.setLevel(logging.INFO)
    train(load_config(None, _sets(twin, True)), tmp_path / "b", ["encoder"])
    messages = [r.getMessage() for r in seen]
    assert any(m.startswith("[encoder] done:") for m in messages), messages
    assert any(m.startswith("[encoder] epoch 1/1") for m in messages), messages
    assert {r.name for r in seen} <= {"neuroimagen.runs.training", "neuroimagen.training.loop"}, {r.name for r in seen}
    assert capsys.readouterr().err == ""  # routed, not printed

    seen.clear()
    clean_root.setLevel(logging.WARNING)  # silenced with the standard API
    train(load_config(None, _sets(twin, True)), tmp_path / "c", ["encoder"])
    assert seen == []


def test_the_cli_writes_the_full_log_into_the_run_and_honours_quiet_and_verbose(twin, tmp_path, run_cli):
    args = ["train", "--out", tmp_path / "r", "--stages", "encoder"] + [a for s in _sets(twin, True) for a in ("--set", s)]
    res = run_cli(*args)
    assert res.code == 0, res
    assert "[encoder] done:" in res.err and "neuroimagen.runs" not in res.err  # concise lines by default
    logs = sorted((tmp_path / "r" / "logs").glob("train-*.log"))
    assert len(logs) == 1 and re.fullmatch(r"train-\d{8}T\d{6}Z\.log", logs[0].name)
    text = logs[0].read_text()
    assert "[encoder] done:" in text and "INFO" in text and "neuroimagen.runs.training" in text  # time, level, source

    quiet = run_cli("-q", *args[:2], tmp_path / "q", *args[3:])
    assert quiet.code == 0 and "[encoder]" not in quiet.err, quiet
    log_q = next((tmp_path / "q" / "logs").glob("train-*.log")).read_text()
    assert "[encoder] done:" in log_q  # -q quiets the terminal, never the run's log

    verbose = run_cli("-v", *args[:2], tmp_path / "v", *args[3:])
    assert verbose.code == 0 and re.search(r"INFO +neuroimagen\.runs\.training: \[encoder\] done:", verbose.err), verbose


def test_without_a_terminal_long_work_logs_a_progress_line_with_an_eta(monkeypatch):
    import time

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    log = get_logger("test.progress")
    log.addHandler(Keep())
    log.setLevel(logging.INFO)
    with Progress(total=10, desc="reconstruct", unit="img", logger=log, interval=0.05, terminal=False) as bar:
        for _ in range(10):
            time.sleep(0.02)
            bar.update(1)
    assert len(lines) >= 2, lines  # several heartbeats over 0.2 s at a 0.05 s interval, plus the last one
    assert re.match(r"reconstruct: \d+/10 img in 0:00 \([\d.]+ img/s, ETA 0:00\)", lines[0]), lines
    assert lines[-1].startswith("reconstruct: 10/10 img")  # the end of a step that had heartbeats
    quiet: list[int] = list(progress(range(3), desc="x", logger=log, enabled=False))
    assert quiet == [0, 1, 2]
    monkeypatch.setenv("NEUROIMAGEN_PROGRESS_INTERVAL", "0.5")
    assert Progress(total=1, terminal=False).interval == 0.5


def test_configure_cli_replaces_its_own_handler():
    root = logging.getLogger("neuroimagen")
    before = [h for h in root.handlers if not getattr(h, "_neuroimagen_cli", False)]
    configure_cli(0)
    configure_cli(1)
    ours = [h for h in root.handlers if getattr(h, "_neuroimagen_cli", False)]
    assert len(ours) == 1 and ours[0].level == logging.DEBUG
    assert [h for h in root.handlers if not getattr(h, "_neuroimagen_cli", False)] == before
