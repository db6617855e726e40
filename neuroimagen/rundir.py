"""Folders neuroimagen owns: an ownership marker, safe ``--overwrite`` and one writer per run directory.

Every output folder the tool creates carries ``.neuroimagen``, a small JSON file saying what wrote it::

    {"tool": "neuroimagen", "format": 1, "kind": "run", "written_by": "neuroimagen train", "created": "...Z"}

``kind`` is ``run`` (train, ablation, demo), ``twin`` (a synthetic twin) or ``sweep`` (tune). Folders
written before the marker existed are recognised by what they always hold (see :func:`kind_of`).
``--overwrite`` replaces only a folder of the same kind that neuroimagen wrote; any other non-empty
folder is one error and is left exactly as it was.

A command that writes a run directory holds ``<run>/.lock`` with ``fcntl.flock`` for as long as it runs;
the file names the holder (one JSON line: pid, command, start time, host, argv). The lock belongs to
the process, not the file: it goes when the process ends, however it ends, so a lock file left by a
killed command never blocks the next one. Only the command layer takes it; Ray workers never do.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

from neuroimagen.atomic import make_dir, write_text
from neuroimagen.errors import OutputError

MARKER = ".neuroimagen"
LOCK = ".lock"
LOGS = "logs"  # every command's log (neuroimagen.logs.log_file), kept when --overwrite empties a run
TENSORBOARD = "tensorboard"  # <run>/tensorboard/<stage>/: TensorBoard event files of each stage (train.tensorboard)
MARKER_FORMAT = 1
KINDS = {"run": "a run directory", "twin": "a synthetic twin", "sweep": "a sweep directory"}
# The first line each writer of the current release puts in its config.yaml (config.write_config, synthesize).
RUN_CONFIG_HEADER = "# Resolved neuroimagen config"
TWIN_CONFIG_HEADER = "# Config of a neuroimagen synthetic twin"
# Entries every run directory written before the marker has besides config.yaml, as soon as a stage started.
_RUN_ENTRIES = ("run.json", "twin", "checkpoints", "ray", "text_encoder", "results")
_BOOKKEEPING = {LOCK, MARKER, LOGS}
_OLDER = {"run": "an older run's config.yaml + run.json", "twin": "an older twin's config.yaml + synth.json",
          "sweep": "an older sweep's space.json"}


def tensorboard_dir(run_dir: str | os.PathLike, stage: str) -> Path:
    """Where stage ``stage`` of the run ``run_dir`` writes its TensorBoard event files."""
    return Path(run_dir) / TENSORBOARD / stage


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline(200)
    except OSError:
        return ""


def read_marker(path: str | os.PathLike) -> Optional[dict]:
    """The marker of folder ``path`` as a dict, or None when there is none (or it is not a regular
    file, or not neuroimagen's): a symlink named ``.neuroimagen`` is never trusted."""
    p = Path(path) / MARKER
    try:
        if not p.is_file() or p.is_symlink() or p.stat().st_size > 4096:
            return None
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("tool") != "neuroimagen" or doc.get("kind") not in KINDS:
        return None
    return doc


def kind_of(path: str | os.PathLike) -> Optional[str]:
    """``'run'``, ``'twin'`` or ``'sweep'`` when neuroimagen wrote the folder ``path``; None otherwise.

    The marker decides. Without one (folders written before it existed):
    a twin has ``synth.json`` and a ``config.yaml`` opening with the twin header; a run has a
    ``config.yaml`` opening with the resolved-config header and one of run.json, twin/, checkpoints/,
    ray/, text_encoder/, results/ (a bare config.yaml is what ``data inspect --out`` leaves in any
    folder, so it alone proves nothing); a sweep has ``space.json`` or a run under ``base/``.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    doc = read_marker(path)
    if doc is not None:
        return doc["kind"]
    if (path / "synth.json").is_file() and _first_line(path / "config.yaml").startswith(TWIN_CONFIG_HEADER):
        return "twin"
    if _first_line(path / "config.yaml").startswith(RUN_CONFIG_HEADER) and any(
            (path / e).exists() for e in _RUN_ENTRIES):
        return "run"
    if (path / "space.json").is_file() or kind_of(path / "base") == "run":
        return "sweep"
    return None


def is_empty(path: str | os.PathLike) -> bool:
    """True when ``path`` is missing, or a folder holding nothing but neuroimagen's own marker, lock and logs."""
    path = Path(path)
    if not path.is_dir():
        return not path.exists() and not path.is_symlink()
    return all(p.name in _BOOKKEEPING for p in path.iterdir())


def _refusal(path: Path, kind: str, verb: str, advice: str) -> Optional[str]:
    """Why ``path`` must not be written (as ``kind``) or replaced; None when it may. ``verb`` opens the
    reason for a non-empty folder, ``advice`` closes it."""
    if path.is_symlink() and not path.exists():
        return "is a dangling symbolic link (expected a new output directory)"
    if path.exists() and not path.is_dir():
        return "exists and is not a directory (expected a new output directory)"
    if is_empty(path):
        return None
    found = kind_of(path)
    if found is None:
        return f"{verb} (not written by neuroimagen: no {MARKER} marker nor {_OLDER[kind]}; {advice})"
    if found != kind:
        return f"{verb} (it holds {KINDS[found]} written by neuroimagen, not {KINDS[kind]}; {advice})"
    return None


def check_target(path: str | os.PathLike, kind: str, overwrite: bool, flag: str = "--out") -> None:
    """Refuse an output folder that must not be written: a file, or a non-empty folder unless
    ``overwrite`` and neuroimagen wrote it as ``kind``. One ``OutputError`` (``flag`` names the option
    that chose the folder); nothing is touched."""
    path = Path(path)
    why = _refusal(path, kind, "refusing to overwrite" if overwrite else "directory exists and is not empty",
                   f"choose a new {flag} or remove it yourself")
    if why is None and not overwrite and not is_empty(path):
        why = f"directory exists and is not empty (choose a new {flag} or pass --overwrite)"
    if why is not None:
        raise OutputError(f"{path}: {why}")


def check_owned(path: str | os.PathLike, kind: str, create: bool = True) -> None:
    """Refuse to write into ``path`` unless it is missing, empty or neuroimagen's ``kind`` folder
    (``create=False``: the folder should already be one, e.g. ``--run RUN``)."""
    path = Path(path)
    if create:
        why = _refusal(path, kind, "directory exists and is not empty", "choose a new --out or remove it yourself")
    else:
        why = _refusal(path, kind, f"not {KINDS[kind]}", f"expected {KINDS[kind]} written by neuroimagen")
    if why is not None:
        raise OutputError(f"{path}: {why}")


def mark(path: str | os.PathLike, kind: str, written_by: str, created: bool = True) -> Path:
    """Write ``path/.neuroimagen`` unless a marker is there already; returns the folder.

    ``created=False`` leaves the timestamp out, for folders whose bytes must depend only on their inputs
    (a synthetic twin: the same seed writes the same files).
    """
    path = Path(path)
    if read_marker(path) is None:
        doc = {"tool": "neuroimagen", "format": MARKER_FORMAT, "kind": kind, "written_by": written_by}
        if created:
            doc["created"] = _utc_now()
        write_text(path / MARKER, json.dumps(doc) + "\n")
    return path


def clear(path: str | os.PathLike) -> None:
    """Remove everything in the neuroimagen folder ``path`` except its lock file and its ``logs/`` (the logs of
    the command that holds it, and of earlier ones).

    Symbolic links are removed, never followed. Raises ``OutputError`` (and removes nothing) when the
    folder is not neuroimagen's.
    """
    path = Path(path)
    if kind_of(path) is None and not is_empty(path):
        raise OutputError(f"{path}: refusing to clear (not written by neuroimagen)")
    for p in sorted(path.iterdir()):
        if p.name in (LOCK, LOGS):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError as exc:
            raise OutputError(f"{p}: cannot remove ({exc.strerror or exc.__class__.__name__})") from exc


def start_fresh(path: str | os.PathLike, kind: str, written_by: str, overwrite: bool = False) -> Path:
    """Make ``path`` a new, empty, marked ``kind`` folder: an existing one only with ``overwrite`` and only
    when neuroimagen wrote it (then its contents go, its lock file stays). Returns the folder."""
    path = Path(path)
    check_target(path, kind, overwrite)
    make_dir(path)
    if not is_empty(path):
        clear(path)
    return mark(path, kind, written_by)


# ---------------------------------------------------------------------------------------------------
# One writer per run directory


def read_holder(path: str | os.PathLike) -> Optional[dict]:
    """What ``<path>/.lock`` says about its last holder (it may be gone), or None."""
    try:
        doc = json.loads((Path(path) / LOCK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and "pid" in doc else None


def _describe_holder(fd: int) -> str:
    # the holder writes its details right after taking the lock: give it a moment before saying "unknown"
    for _ in range(20):
        try:
            doc = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        except ValueError:
            time.sleep(0.05)
            continue
        if isinstance(doc, dict) and "pid" in doc:
            host = doc.get("host")
            where = f" on {host}" if host and host != socket.gethostname() else ""
            return f"pid {doc['pid']}{where} ({doc.get('command', '?')}, since {doc.get('since', '?')})"
        time.sleep(0.05)
    return "another process (its lock file names no holder yet)"


@contextlib.contextmanager
def hold(path: str | os.PathLike, command: str, kind: str = "run", create: bool = True) -> Iterator[Path]:
    """Hold the run directory ``path`` for the caller's whole duration: the one writer there.

    ``create``: a command that makes the folder (train, ablation, demo, tune): a missing folder is
    created and marked; an existing non-empty one must be neuroimagen's ``kind`` folder. Otherwise
    (reconstruct, evaluate, report) a missing or empty folder is left alone, unlocked, for the command
    to report what it lacks. A second holder gets one ``OutputError`` naming the first one's pid.
    """
    path = Path(path)
    check_owned(path, kind, create)
    if not create and is_empty(path):
        yield path
        return
    make_dir(path)
    lock = path / LOCK
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise OutputError(f"{lock}: cannot open the lock file ({exc.strerror or exc.__class__.__name__})") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"{path}: in use by {_describe_holder(fd)}; wait for it or choose another --out") from None
        except OSError as exc:
            raise OutputError(f"{lock}: cannot lock ({exc.strerror or exc.__class__.__name__}; the file system must "
                              f"support flock)") from exc
        holder = {"pid": os.getpid(), "command": command, "since": _utc_now(), "host": socket.gethostname(),
                  "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        if create:
            mark(path, kind, command)
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # released: an empty lock file names nobody
    finally:
        os.close(fd)  # closing the last descriptor releases the flock
