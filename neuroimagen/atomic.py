"""Atomic outputs: a file or directory either appears whole under its final name or not at all.

Readers of a run directory may therefore trust any file they find: a crash or a full disk leaves at
most a ``*.partial-*`` sibling behind, which nothing reads and the next writer removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from neuroimagen.errors import OutputError

PARTIAL_TAG = ".partial-"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _describe(exc: OSError) -> str:
    return exc.strerror or exc.__class__.__name__


def _torch_write_failure(exc: BaseException) -> bool:
    """``torch.save`` reports a failed write (disk full, file size limit) as a RuntimeError, not an OSError."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text)


_TORCH_WRITE = "write failed: no space left on device or file too large"


def make_dir(path: str | os.PathLike) -> Path:
    """``mkdir -p`` whose failure (a parent that is a file, no permission, disk full) is one ``OutputError``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create the directory ({_describe(exc)})") from exc
    return path


def remove_partials(root: str | os.PathLike) -> int:
    """Delete the ``*.partial-*`` leftovers of interrupted writers under ``root``; returns how many.

    Only for a directory this process owns (no other writer running there): a live writer's temporary
    file would be removed too.
    """
    n = 0
    root = Path(root)
    if not root.is_dir():
        return 0
    for p in sorted(root.rglob(f"*{PARTIAL_TAG}*"), key=lambda q: len(q.parts), reverse=True):
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            n += 1
    return n


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success rename it over ``final``.

    Works for a file written by any library (``torch.save``, ``np.save``, ``pyarrow``...). On any
    error the temporary file is removed and an OSError becomes an ``OutputError`` naming ``final``.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=final.name + PARTIAL_TAG, dir=final.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
    except OSError as exc:
        raise OutputError(f"{final}: cannot write ({_describe(exc)})") from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise OutputError(f"{final}: cannot write ({_describe(exc)})") from exc
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if _torch_write_failure(exc):
            raise OutputError(f"{final}: cannot write ({_TORCH_WRITE})") from exc
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def check_new_dir(out: Path, overwrite: bool) -> None:
    """Refuse to replace a non-empty directory unless ``overwrite``; one clear error."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory (expected a new output directory)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: directory exists and is not empty (choose a new --out or pass --overwrite)")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh staging directory; on success it replaces ``final`` in one rename.

    A non-empty ``final`` is an error unless ``overwrite``. On failure the staging directory is
    deleted and ``final`` is untouched.
    """
    final = Path(final)
    check_new_dir(final, overwrite)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=final.name + PARTIAL_TAG, dir=final.parent))
        os.chmod(stage, 0o777 & ~_umask())
    except OSError as exc:
        raise OutputError(f"{final}: cannot write ({_describe(exc)})") from exc
    try:
        yield stage
        old = None
        if final.exists():
            old = final.with_name(final.name + PARTIAL_TAG + "old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        try:
            os.replace(stage, final)
        except OSError:
            if old is not None:  # put the previous version back: ``final`` is never left missing
                os.replace(old, final)
            raise
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise OutputError(f"{final}: cannot write ({_describe(exc)})") from exc
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        if _torch_write_failure(exc):
            raise OutputError(f"{final}: cannot write ({_TORCH_WRITE})") from exc
        raise
