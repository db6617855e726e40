"""Messages and progress: the library logs, the command line decides where the lines go.

Every module logs through ``logging.getLogger("neuroimagen.<module>")`` (``get_logger(__name__)``) and never
prints. Nothing is shown until a handler is attached: the CLI attaches one (``configure_cli``: the concise
terminal lines, ``-v`` for debug, ``-q`` for warnings only) and writes each command's full log into the run
(``log_file``: ``<run>/logs/<command>-<UTC time>.log``). A notebook routes or silences messages with the
standard API, e.g. ``logging.getLogger("neuroimagen").setLevel(logging.WARNING)``.

``progress`` is a tqdm bar when stderr is a terminal; without one (``ray job`` logs, ``nohup``, CI) a bar shows
nothing, so it logs a line with the rate and the ETA every ``interval`` seconds instead, and one at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Optional

ROOT = "neuroimagen"
CONCISE = "%(message)s"
DETAILED = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
HEARTBEAT_ENV = "NEUROIMAGEN_PROGRESS_INTERVAL"  # seconds between progress lines without a terminal (default 30)


def get_logger(name: str) -> logging.Logger:
    """The logger of a module of the package (``get_logger(__name__)``)."""
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")


def configure_cli(verbosity: int = 0, stream=None) -> logging.Handler:
    """Attach the terminal handler of the command line: ``verbosity`` -1 (``-q``) warnings only, 0 the concise
    progress lines (INFO), 1 (``-v``) everything (DEBUG, with logger names). Replaces a handler it attached before."""
    root = logging.getLogger(ROOT)
    for h in list(root.handlers):
        if getattr(h, "_neuroimagen_cli", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler._neuroimagen_cli = True  # type: ignore[attr-defined]
    level = logging.WARNING if verbosity < 0 else (logging.DEBUG if verbosity > 0 else logging.INFO)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(DETAILED if verbosity > 0 else CONCISE))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # handlers filter; the run's log file records everything
    return handler


@contextlib.contextmanager
def log_file(run_dir: str | os.PathLike, command: str) -> Iterator[Path]:
    """Record every message (DEBUG and up, with time and logger) of ``command`` in
    ``<run_dir>/logs/<command>-<UTC time>.log`` while the block runs."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(run_dir) / "logs" / f"{command}-{stamp}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8", delay=False)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(DETAILED))
    root = logging.getLogger(ROOT)
    previous = root.level
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.DEBUG:
        root.setLevel(logging.DEBUG)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()


def _interval() -> float:
    try:
        return max(0.1, float(os.environ.get(HEARTBEAT_ENV, "30")))
    except ValueError:
        return 30.0


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Count work done; a tqdm bar on a terminal, else a heartbeat line every ``interval`` s (see the module doc).

    Use as a context manager, call ``update(n)``; or iterate ``progress(iterable, ...)``.
    """

    def __init__(self, total: Optional[int] = None, desc: str = "", unit: str = "it",
                 logger: Optional[logging.Logger] = None, enabled: bool = True, interval: Optional[float] = None,
                 terminal: Optional[bool] = None):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.logger = logger or get_logger("progress")
        self.interval = _interval() if interval is None else interval
        self.n, self.t0 = 0, time.monotonic()
        self.last = self.t0
        self.postfix = ""
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = None
        if enabled and terminal:
            from tqdm.auto import tqdm  # noqa: PLC0415 - only when a terminal shows it

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        eta = f", ETA {_eta((self.total - self.n) / rate)}" if self.total and rate > 0 and self.n < self.total else ""
        extra = f" ({self.postfix})" if self.postfix else ""
        return f"{self.desc}: {done} {self.unit} in {_eta(elapsed)} ({rate:.3g} {self.unit}/s{eta}){extra}"

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.logger.info(self.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.n and time.monotonic() - self.t0 >= self.interval:
            self.logger.info(self.line())  # the end of a step long enough to have had heartbeats
        self.enabled = False


def progress(iterable: Iterable, total: Optional[int] = None, desc: str = "", unit: str = "it",
             logger: Optional[logging.Logger] = None, enabled: bool = True) -> Iterator:
    """Iterate ``iterable`` with a ``Progress`` (``total`` from ``len`` when it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total=total, desc=desc, unit=unit, logger=logger, enabled=enabled) as bar:
        for item in iterable:
            yield item
            bar.update(1)
