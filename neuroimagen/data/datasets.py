"""One Dataset for every format: read the files a ``DataConfig`` names with the right reader.

``load_recording`` returns a validated ``Recording`` (``recording.py``); ``load_splits`` its train / val /
test ``EEGDataset``s. The readers live in ``eeg_imagenet.py`` and ``things_eeg.py``.
"""

from __future__ import annotations

from neuroimagen.data.captions import load_captions
from neuroimagen.data.eeg_imagenet import load_eeg_imagenet
from neuroimagen.data.recording import SPLITS, EEGDataset, ImageMode, Recording, load_image
from neuroimagen.data.things_eeg import load_things_eeg
from neuroimagen.errors import DataError

__all__ = ["EEGDataset", "Recording", "load_image", "load_recording", "load_splits"]


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
    return rec


def load_splits(cfg, image_mode: ImageMode = "tensor") -> dict[str, EEGDataset]:
    """``{'train', 'val', 'test'}`` datasets of a ``DataConfig`` (the file is read once)."""
    rec = load_recording(cfg, check_images=image_mode != "none")
    return {s: rec.dataset(s, image_mode=image_mode, image_size=cfg.image_size) for s in SPLITS}
