"""A ``Recording`` (a parsed, validated file: segments, labels, subjects, stems, image paths, splits) and
``EEGDataset``, a split of it served as a torch Dataset::

    {'eeg': (C, T) float32, 'label': int, 'subject': int, 'stem': str, 'index': int,
     'image': (3, H, W) float32 in [0, 1]  |  str path  |  absent}

EEG segments are kept as views into the loaded tensors; the time window and z-scoring are applied
per item, so building a dataset costs little more than reading the file. The readers
(``eeg_imagenet.py``, ``things_eeg.py``) build a ``Recording`` with the checks at the end of this module;
``datasets.py`` picks the reader for a config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from neuroimagen.data.captions import label_caption
from neuroimagen.errors import DataError

SPLITS = ("train", "val", "test")
ImageMode = Literal["tensor", "path", "none"]


@dataclass
class Recording:
    """Everything a reader extracted from the files, after validation and filtering.

    ``segments[j]`` is a (C, T_j) tensor view; ``splits[name]`` holds indices into ``segments``.
    """

    format: str
    source: str
    segments: list  # list[Tensor (C, T_j)]
    labels: np.ndarray  # (N,) int64
    subjects: np.ndarray  # (N,) int64
    stems: list[str]  # (N,)
    image_paths: list[Optional[str]]  # (N,)
    class_ids: list[str]  # WNIDs or THINGS concept folders, label index order
    class_names: list[str]  # human-readable, label index order
    splits: dict[str, np.ndarray]
    window: Optional[tuple[int, int]] = None
    norm: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (mean, std), each broadcastable to (C, T)
    captions: Optional[dict[str, str]] = None
    notes: list[str] = field(default_factory=list)  # deviations and choices worth reporting

    @property
    def n_channels(self) -> int:
        return int(self.segments[0].shape[0]) if self.segments else 0

    @property
    def n_times(self) -> int:
        if self.window is not None:
            return self.window[1] - self.window[0]
        return int(self.segments[0].shape[1]) if self.segments else 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def label_captions(self) -> list[str]:
        """'An image of <name>' for every class, label index order."""
        return [label_caption(n) for n in self.class_names]

    def segment(self, j: int) -> torch.Tensor:
        """Segment ``j`` windowed and normalised: (C, T) float32, contiguous."""
        x = self.segments[j]
        if self.window is not None:
            x = x[:, self.window[0]: self.window[1]]
        x = x.float()
        if self.norm is not None:
            start = self.window[0] if self.window is not None else 0
            # each of mean, std is (C, 1) or per-sample (C, T_full); only the per-sample ones are windowed
            mean, std = (v[:, start: start + x.shape[1]] if v.shape[1] > 1 else v for v in self.norm)
            x = (x - mean) / std
        return x.contiguous()

    def dataset(self, split: str, image_mode: ImageMode = "tensor", image_size: int = 64) -> "EEGDataset":
        if split not in self.splits:
            raise DataError(f"{self.source}: no '{split}' split (have: {', '.join(self.splits) or 'none'})")
        return EEGDataset(self, self.splits[split], split, image_mode=image_mode, image_size=image_size)


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """Read an image as (3, size, size) float32 in [0, 1]: short side resized, centre-cropped."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({exc.__class__.__name__}: {exc})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)


class EEGDataset(Dataset):
    """A split of a ``Recording`` as a torch Dataset (see the module docstring for the item)."""

    def __init__(self, recording: Recording, indices: Sequence[int], split: str,
                 image_mode: ImageMode = "tensor", image_size: int = 64):
        if image_mode not in ("tensor", "path", "none"):
            raise ValueError(f"image_mode: expected 'tensor', 'path' or 'none', got {image_mode!r}")
        if image_mode != "none":
            missing = [recording.stems[j] for j in indices if recording.image_paths[j] is None]
            if missing:
                raise DataError(f"data.images: not set, but images were requested ({len(missing)} items have no image path)")
        self.recording = recording
        self.indices = np.asarray(indices, dtype=np.int64)
        self.split = split
        self.image_mode = image_mode
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        rec = self.recording
        j = int(self.indices[i])
        item = {
            "eeg": rec.segment(j),  # (C, T)
            "label": int(rec.labels[j]),
            "subject": int(rec.subjects[j]),
            "stem": rec.stems[j],
            "index": j,
        }
        if self.image_mode == "tensor":
            item["image"] = load_image(rec.image_paths[j], self.image_size)  # (3, H, W)
        elif self.image_mode == "path":
            item["image"] = rec.image_paths[j]
        return item

    # Views used by stages and reports -------------------------------------------------------
    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self.recording.labels[self.indices])

    @property
    def subjects(self) -> torch.Tensor:
        return torch.from_numpy(self.recording.subjects[self.indices])

    @property
    def stems(self) -> list[str]:
        return [self.recording.stems[j] for j in self.indices]

    @property
    def class_names(self) -> list[str]:
        return self.recording.class_names

    @property
    def num_classes(self) -> int:
        return self.recording.num_classes

    @property
    def n_channels(self) -> int:
        return self.recording.n_channels

    @property
    def n_times(self) -> int:
        return self.recording.n_times

    def eeg_tensor(self) -> torch.Tensor:
        """All segments of the split stacked: (N, C, T) float32."""
        if len(self) == 0:
            return torch.empty(0, self.n_channels, self.n_times)
        return torch.stack([self.recording.segment(int(j)) for j in self.indices])

    def captions(self, kind: Literal["label", "image"]) -> list[str]:
        """Per-item caption: the label caption, or the per-image caption (BLIP / twin)."""
        rec = self.recording
        if kind == "label":
            caps = rec.label_captions()
            return [caps[int(rec.labels[j])] for j in self.indices]
        if rec.captions is None:
            raise DataError("data.captions: per-image captions requested but no captions file is configured")
        missing = [rec.stems[j] for j in self.indices if rec.stems[j] not in rec.captions]
        if missing:
            raise DataError(f"data.captions: no caption for {len(missing)} images, e.g. '{missing[0]}'")
        return [rec.captions[rec.stems[j]] for j in self.indices]


def is_finite(x: torch.Tensor) -> bool:
    """True when every element of ``x`` is finite.

    A sum is NaN/Inf whenever any element is, so a finite sum proves the tensor finite without
    allocating a mask; only a non-finite sum (a bad value, or an overflow of huge values) pays for
    the exact check. Reading a dataset spends most of its validation time here.
    """
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def check_finite(segments: list, indices, source: str, what: str) -> None:
    """Raise a DataError naming the first segment holding NaN/Inf."""
    for j in indices:
        if not is_finite(segments[j]):
            raise DataError(f"{source}: {what}[{int(j)}]['eeg'] contains NaN or Inf (expected finite values)")


def image_missing(paths: Sequence[Optional[str]]) -> list[str]:
    """Paths that do not exist (each distinct path checked once)."""
    seen: dict[str, bool] = {}
    out = []
    for p in paths:
        if p is None:
            continue
        if p not in seen:
            seen[p] = Path(p).is_file()
            if not seen[p]:
                out.append(p)
    return out
