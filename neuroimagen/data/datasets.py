"""One Dataset for every format: read the files a ``DataConfig`` names with the right reader.

``load_recording`` returns a validated ``Recording`` (``recording.py``); ``load_splits`` its train / val /
test ``EEGDataset``s. The readers live in ``eeg_imagenet.py`` and ``things_eeg.py``.

Leave-one-subject-out (``data.holdout_subject``, both formats): :func:`hold_out_subject` re-splits a recording so
that train and val hold only the other subjects' train and val trials and test only the held-out subject's
test trials (its train and val trials are used nowhere). Every stage, sweep and model selection then sees
validation data of the training subjects only, and the held-out subject is evaluated on the same test trials
as within subject.
"""

from __future__ import annotations

import numpy as np

from neuroimagen.data.captions import load_captions
from neuroimagen.data.eeg_imagenet import load_eeg_imagenet
from neuroimagen.data.recording import SPLITS, EEGDataset, ImageMode, Recording, load_image
from neuroimagen.data.things_eeg import load_things_eeg
from neuroimagen.errors import ConfigError, DataError

__all__ = ["EEGDataset", "Recording", "hold_out_subject", "load_image", "load_recording", "load_splits", "subjects_of"]


def subjects_of(dataset: Recording | EEGDataset) -> list[int]:
    """The sorted subject ids of one split, or of a recording's splits together (the segments a reader kept: an
    EEG-ImageNet file's subjects outside ``data.subjects`` are not among them)."""
    if isinstance(dataset, Recording):
        used = np.concatenate([np.asarray(v, dtype=np.int64) for v in dataset.splits.values()] or [np.empty(0, np.int64)])
        return sorted(int(s) for s in np.unique(dataset.subjects[used]))
    return sorted(int(s) for s in np.unique(dataset.subjects.numpy()))


def hold_out_subject(rec: Recording, subject: int) -> dict[str, np.ndarray]:
    """The splits of ``rec`` with ``subject`` left out: train / val = the other subjects' train / val indices,
    test = ``subject``'s test indices (split order kept). ConfigError naming ``data.holdout_subject`` when the
    subject is not in the recording or is its only subject."""
    have = subjects_of(rec)
    if subject not in have:
        raise ConfigError(f"data.holdout_subject: subject {subject} is not among the dataset's subjects {have} "
                          f"({rec.source})")
    if len(have) < 2:
        raise ConfigError(f"data.holdout_subject: holding out subject {subject} leaves no training subject "
                          f"({rec.source} has subjects {have})")
    held = rec.subjects == subject  # (N,) bool over segments
    out = {name: idx[~held[idx]] for name, idx in rec.splits.items() if name != "test"}
    out["test"] = rec.splits["test"][held[rec.splits["test"]]]
    return out


def load_recording(cfg, check_images: bool = True) -> Recording:
    """Read the files named by a ``DataConfig`` into a validated ``Recording``."""
    if cfg.eeg is None:
        raise DataError("data.eeg: not set (expected the EEG file or folder; use --set data.eeg=PATH)")
    if cfg.format == "eeg-imagenet":
        rec = load_eeg_imagenet(cfg, check_images=check_images)
    else:
        rec = load_things_eeg(cfg, check_images=check_images)
    if cfg.captions is not None:
        rec.captions = load_captions(cfg.captions)
    if cfg.holdout_subject is not None:
        rec.splits = hold_out_subject(rec, cfg.holdout_subject)
        rec.notes.append(f"leave-one-subject-out: subject {cfg.holdout_subject} held out (train / val from subjects "
                         f"{[s for s in subjects_of(rec) if s != cfg.holdout_subject]}, test from subject "
                         f"{cfg.holdout_subject} only)")
    return rec


def load_splits(cfg, image_mode: ImageMode = "tensor") -> dict[str, EEGDataset]:
    """``{'train', 'val', 'test'}`` datasets of a ``DataConfig`` (the file is read once)."""
    rec = load_recording(cfg, check_images=image_mode != "none")
    return {s: rec.dataset(s, image_mode=image_mode, image_size=cfg.image_size) for s in SPLITS}
