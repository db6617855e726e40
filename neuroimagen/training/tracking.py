"""Experiment tracking: TensorBoard event files of a stage's training (``train.tensorboard``).

``fit()`` hands every epoch's metrics to a ``Tracker`` (rank 0 only), and a stage's sample images when it has
any (``Stage.images``: the saliency GAN's grid every ``stages.saliency.image_every`` epochs and after the last).
Tags: ``train_<x>`` -> ``train/<x>``, ``val_<x>`` -> ``val/<x>``, anything else (``epoch_seconds``) ->
``time/<x>``; the step is the number of epochs trained (1 for the first epoch, as the progress lines count),
and the untrained model's validation metrics are step 0.

Event files are append-only logs, not results: a resumed stage opens a new file in the same folder and TensorBoard
reads them together. They are written with ``tensorboardX`` (a dependency of Ray Train and Tune); without it
tracking is off, said in one log line. ``read_events`` reads them back without TensorBoard (tests, notebooks).
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch

from neuroimagen.logs import get_logger

try:
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.summary_pb2 import Summary
    from tensorboardX.summary import image as image_summary
except ImportError:  # tracking is optional: without the writer library a run trains as before
    EventsWriter = Event = Summary = image_summary = None

_log = get_logger(__name__)
MISSING = "TensorBoard tracking is off: tensorboardX is not installed (pip install tensorboardX)"


class Tracker(Protocol):
    """Where ``fit()`` sends what it tracks (only rank 0 has one)."""

    def scalars(self, metrics: dict, step: int) -> None: ...

    def images(self, images: dict[str, torch.Tensor], step: int) -> None: ...

    def close(self) -> None: ...


def tag(key: str) -> str:
    """The TensorBoard tag of a metric key: ``train_loss`` -> ``train/loss``, ``val_ssim`` -> ``val/ssim``,
    ``epoch_seconds`` -> ``time/epoch_seconds``."""
    for prefix in ("train", "val"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return f"time/{key}"


class EventWriter:
    """A ``Tracker`` writing one TensorBoard event file in ``logdir``, synchronously: each call is on disk when it
    returns. (tensorboardX's ``SummaryWriter`` queues events for a background thread, so a process killed after an
    epoch's checkpoint could lose that epoch's scalars, and a resumed run never writes them again.)"""

    def __init__(self, logdir: str | os.PathLike):
        if EventsWriter is None:
            raise ImportError(MISSING)
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        # a file of its own even when a resumed run opens the folder within the same second (names carry seconds)
        self._events = EventsWriter(str(self.logdir / "events"), filename_suffix=f".{time.time_ns()}")

    def _write(self, summary, step: int) -> None:
        self._events.write_event(Event(wall_time=time.time(), step=int(step), summary=summary))
        self._events.flush()

    def scalars(self, metrics: dict, step: int) -> None:
        values = [Summary.Value(tag=tag(k), simple_value=float(v)) for k, v in metrics.items()
                  if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)]
        if values:
            self._write(Summary(value=values), step)

    def images(self, images: dict[str, torch.Tensor], step: int) -> None:
        """``images``: tag -> one (3, H, W) image in [0, 1]."""
        for name, img in images.items():
            self._write(image_summary(name, img.detach().float().clamp(0, 1).cpu().numpy(), dataformats="CHW"), step)

    def close(self) -> None:
        self._events.close()


_said_missing = False


def open_tracker(logdir: Optional[str | os.PathLike], enabled: bool) -> Optional[EventWriter]:
    """An ``EventWriter`` into ``logdir`` when tracking is ``enabled`` and a folder is given, else None; without
    tensorboardX, None and one warning line (once per process: ``say_missing``)."""
    if not enabled or logdir is None:
        return None
    if EventsWriter is None:
        say_missing()
        return None
    return EventWriter(logdir)


def say_missing(log: Optional[Callable[[str], None]] = None) -> None:
    """The one line that says tracking is off for want of tensorboardX (the first call of a process only)."""
    global _said_missing
    if not _said_missing:
        _said_missing = True
        (log or _log.warning)(MISSING)


def available() -> bool:
    """Can event files be written here (is tensorboardX installed)?"""
    return EventsWriter is not None


def _records(path: Path):
    """The records of one TFRecord file (length, its CRC, data, its CRC); a record cut short at the end (a writer
    killed mid-write) ends the file."""
    with open(path, "rb") as f:
        while True:
            head = f.read(12)
            if len(head) < 12:
                return
            (n,) = struct.unpack("<Q", head[:8])
            data = f.read(n)
            if len(data) < n or len(f.read(4)) < 4:
                return
            yield data


def read_events(logdir: str | os.PathLike) -> dict:
    """Everything the event files under ``logdir`` (recursively) hold, in file then write order:
    ``{'scalars': {tag: [(step, value), ...]}, 'images': {tag: [(step, height, width), ...]}}``."""
    if Event is None:
        raise ImportError(MISSING)
    scalars: dict[str, list] = {}
    images: dict[str, list] = {}
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        for data in _records(path):
            ev = Event.FromString(data)
            if not ev.HasField("summary"):
                continue
            for v in ev.summary.value:
                kind = v.WhichOneof("value")
                if kind == "image":
                    images.setdefault(v.tag, []).append((int(ev.step), v.image.height, v.image.width))
                elif kind == "simple_value":
                    scalars.setdefault(v.tag, []).append((int(ev.step), float(v.simple_value)))
    return {"scalars": scalars, "images": images}
