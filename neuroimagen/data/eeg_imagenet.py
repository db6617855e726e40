"""EEG-ImageNet (Spampinato et al. 2017) reader, exactly as the released files are laid out.

EEG file (``eeg_5_95_std.pth``, ``eeg_14_70_std.pth``, ``eeg_55_95_std.pth``,
``eeg_signals_raw_with_mean_std.pth``), read with ``torch.load(weights_only=True)``::

    {'dataset': [{'eeg': FloatTensor[C, T], 'image': int, 'label': int, 'subject': int}, ...],
     'labels':  [WNID, ...],          # label index order
     'images':  [stem, ...],          # 'n02951358_31190'; image i is <images>/<wnid>/<stem>.JPEG
     'means', 'stddevs'}              # raw file only: z-scoring statistics

Split file (``block_splits_by_image_{all,single}.pth``)::

    {'splits': [{'train': [idx, ...], 'val': [...], 'test': [...]}, ...]}

``_all`` indices point into the whole ``dataset`` list; ``_single`` indices point into the list
filtered to one subject (here: applied to each selected subject's list in turn).

Length filter: the public Splitter keeps ``450 <= T <= 600`` and then crops ``[20:460]``, so a
segment with 450 <= T < 460 would yield fewer than 440 samples. We keep
``max(min_length, window_stop) <= T <= max_length``: every kept segment fills the window.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from neuroimagen.config import read_yaml_mapping  # YAML is a superset of JSON
from neuroimagen.data.imagenet_classes import CLASS_NAMES
from neuroimagen.data.recording import SPLITS, Recording, check_finite, image_missing
from neuroimagen.errors import ConfigError, DataError

STEM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")  # used with fullmatch ('$' would pass a trailing newline)
RAW_KEYS = ("means", "stddevs")


def torch_load_dict(path: str | os.PathLike, key: str) -> dict:
    """``torch.load(path, weights_only=True)``; anything but a readable dict is one DataError."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{key}: {p}: file not found")
    if not p.is_file():
        raise DataError(f"{key}: {p}: expected a file, got a directory")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        # A refused pickle is explained on torch's 'WeightsUnpickler error:' line, after generic advice.
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = [ln.split("WeightsUnpickler error:", 1)[1].split(". ")[0] for ln in lines if "WeightsUnpickler error:" in ln]
        reason = re.sub(r"\x1b\[[0-9;]*m", "", (why or lines or [""])[0]).strip()[:160]
        raise DataError(
            f"{key}: {p}: cannot read as a torch-saved file (truncated, corrupt or not a .pth of "
            f"plain data: {exc.__class__.__name__}{': ' + reason if reason else ''})"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{key}: {p}: expected a dict at the top level, got {type(obj).__name__}")
    return obj


def load_class_table(path: Optional[str]) -> dict[str, str]:
    """The shipped WNID -> name table, extended by an optional user mapping file."""
    table = dict(CLASS_NAMES)
    if path is None:
        return table
    try:
        extra = read_yaml_mapping(path, what="class-name")
    except ConfigError as exc:
        raise DataError(f"data.class_names: {exc}") from None
    for k, v in extra.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise DataError(f"data.class_names: {path}: expected WNID: name strings, got {k!r}: {v!r}")
        table[k] = v
    return table


class EEGImageNetFile:
    """A structurally validated EEG file: raises DataError naming the file and key on any fault."""

    def __init__(self, path: str | os.PathLike, class_table: dict[str, str], key: str = "data.eeg"):
        self.path = str(path)
        obj = torch_load_dict(path, key)
        where = f"{key}: {path}"
        for k in ("dataset", "labels", "images"):
            if k not in obj:
                raise DataError(f"{where}: missing key '{k}' (expected 'dataset', 'labels', 'images')")
        labels, images, dataset = obj["labels"], obj["images"], obj["dataset"]
        if not isinstance(labels, (list, tuple)) or not all(isinstance(w, str) for w in labels) or not labels:
            raise DataError(f"{where}: 'labels' must be a non-empty list of WordNet id strings")
        for i, w in enumerate(labels):
            if w not in class_table:
                raise DataError(
                    f"{where}: labels[{i}]: unknown WordNet id '{w}' (expected one of the 40 EEG-ImageNet "
                    f"classes, or add it with data.class_names)"
                )
        if not isinstance(images, (list, tuple)) or not all(isinstance(s, str) for s in images):
            raise DataError(f"{where}: 'images' must be a list of image stem strings")
        for i, s in enumerate(images):
            if not STEM_RE.fullmatch(s) or ".." in s:
                raise DataError(
                    f"{where}: images[{i}]: invalid image stem {s!r} (expected '<wnid>_<number>', no path separators)"
                )
        if not isinstance(dataset, (list, tuple)) or not dataset:
            raise DataError(f"{where}: 'dataset' must be a non-empty list of segment dicts")

        n = len(dataset)
        eeg: list = [None] * n
        lab = np.empty(n, dtype=np.int64)
        img = np.empty(n, dtype=np.int64)
        sub = np.empty(n, dtype=np.int64)
        lengths = np.empty(n, dtype=np.int64)
        channels = None
        for i, d in enumerate(dataset):
            if not isinstance(d, dict):
                raise DataError(f"{where}: dataset[{i}]: expected a dict, got {type(d).__name__}")
            for k in ("eeg", "image", "label", "subject"):
                if k not in d:
                    raise DataError(f"{where}: dataset[{i}]: missing key '{k}' (expected 'eeg', 'image', 'label', 'subject')")
            x = d["eeg"]
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise DataError(f"{where}: dataset[{i}]['eeg']: expected a float tensor, got {type(x).__name__}"
                                + (f" of {x.dtype}" if isinstance(x, torch.Tensor) else ""))
            if x.layout != torch.strided:
                raise DataError(f"{where}: dataset[{i}]['eeg']: expected a dense tensor, got layout {x.layout}")
            if x.dim() != 2:
                raise DataError(f"{where}: dataset[{i}]['eeg']: expected a 2-D tensor (channels, time), got shape {tuple(x.shape)}")
            if x.shape[0] == 0:
                raise DataError(f"{where}: dataset[{i}]['eeg']: expected at least one channel, got shape {tuple(x.shape)}")
            if channels is None:
                channels = x.shape[0]
            elif x.shape[0] != channels:
                raise DataError(f"{where}: dataset[{i}]['eeg']: expected {channels} channels like dataset[0], got {x.shape[0]}")
            for k, hi in (("label", len(labels)), ("image", len(images))):
                v = d[k]
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < hi:
                    raise DataError(f"{where}: dataset[{i}]['{k}']: expected an integer in [0, {hi}), got {v!r}")
            s = d["subject"]
            if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < 2**63:
                raise DataError(f"{where}: dataset[{i}]['subject']: expected a non-negative integer (64-bit), got {s!r}")
            eeg[i] = x
            lab[i], img[i], sub[i] = d["label"], d["image"], s
            lengths[i] = x.shape[1]

        self.segments = eeg
        self.labels_idx, self.image_idx, self.subjects, self.lengths = lab, img, sub, lengths
        self.wnids: list[str] = list(labels)
        self.stems: list[str] = list(images)
        self.n_channels = int(channels)
        self.norm = None
        present = [k for k in RAW_KEYS if k in obj]
        if present:
            if len(present) != 2:
                raise DataError(f"{where}: has '{present[0]}' but not '{({*RAW_KEYS} - {present[0]}).pop()}' (raw files carry both)")
            self.norm = (self._norm_tensor(obj["means"], "means", where), self._norm_tensor(obj["stddevs"], "stddevs", where))
            if not bool((self.norm[1] > 0).all()):
                raise DataError(f"{where}: 'stddevs' must be > 0 everywhere")

    def _norm_tensor(self, v, name: str, where: str) -> torch.Tensor:
        if not isinstance(v, torch.Tensor):
            try:
                v = torch.as_tensor(v, dtype=torch.float32)
            except Exception:  # noqa: BLE001
                raise DataError(f"{where}: '{name}': expected a tensor, got {type(v).__name__}") from None
        v = v.float()
        if not bool(torch.isfinite(v).all()):
            raise DataError(f"{where}: '{name}' contains NaN or Inf")
        C = self.n_channels
        if v.dim() == 0 or (v.dim() == 1 and v.numel() == 1):
            return v.reshape(1, 1).expand(C, 1).contiguous()
        if v.dim() == 1 and v.shape[0] == C:
            return v[:, None]  # (C, 1)
        if v.dim() == 2 and v.shape[0] == C and v.shape[1] >= 1:
            return v  # (C, 1) or per-sample (C, T_full)
        raise DataError(f"{where}: '{name}': expected shape ({C},), ({C}, 1) or ({C}, T), got {tuple(v.shape)}")

    @property
    def is_raw(self) -> bool:
        return self.norm is not None

    def wnid_of_stem(self, stem: str) -> str:
        return stem.split("_")[0]

    def image_path(self, root: str, image_index: int) -> str:
        stem = self.stems[image_index]
        return os.path.join(root, self.wnid_of_stem(stem), stem + ".JPEG")  # (os.path: ~5x faster than Path here)


def split_semantics(path: str, requested: str) -> str:
    """'all' or 'single' from the config, or from the split file name when 'auto'."""
    if requested != "auto":
        return requested
    name = Path(path).name
    if "_single" in name:
        return "single"
    if "_all" in name:
        return "all"
    raise DataError(
        f"data.splits: {path}: cannot tell from the file name whether indices point into all segments "
        f"(_all) or one subject's (_single); set data.split_semantics to 'all' or 'single'"
    )


def read_split_file(path: str, key: str = "data.splits") -> list[dict[str, list[int]]]:
    """The validated ``splits`` list: each entry has integer lists 'train', 'val', 'test'."""
    obj = torch_load_dict(path, key)
    where = f"{key}: {path}"
    if "splits" not in obj:
        raise DataError(f"{where}: missing key 'splits' (expected {{'splits': [{{'train', 'val', 'test'}}, ...]}})")
    splits = obj["splits"]
    if not isinstance(splits, (list, tuple)) or not splits:
        raise DataError(f"{where}: 'splits' must be a non-empty list of dicts")
    out = []
    for k, sp in enumerate(splits):
        if not isinstance(sp, dict):
            raise DataError(f"{where}: splits[{k}]: expected a dict with 'train', 'val', 'test', got {type(sp).__name__}")
        entry = {}
        for name in SPLITS:
            if name not in sp:
                raise DataError(f"{where}: splits[{k}]: missing key '{name}' (expected 'train', 'val', 'test')")
            idx = sp[name]
            if isinstance(idx, torch.Tensor):
                idx = idx.tolist()
            if not isinstance(idx, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
                raise DataError(f"{where}: splits[{k}]['{name}']: expected a list of integer indices")
            entry[name] = list(idx)
        out.append(entry)
    return out


def first_out_of_range(idx: list[int], n: int) -> Optional[int]:
    """The first index of ``idx`` outside [0, n), or None."""
    try:
        a = np.asarray(idx, dtype=np.int64)
    except OverflowError:  # beyond int64, so out of range whatever n is
        return next(i for i in idx if not 0 <= i < n)
    bad = a[(a < 0) | (a >= n)]
    return int(bad[0]) if bad.size else None


def map_split_indices(f: EEGImageNetFile, split: dict[str, list[int]], semantics: str,
                      subjects: list[int], where: str) -> dict[str, np.ndarray]:
    """Split indices -> positions in ``f.segments`` (before the subject and length filters)."""
    out = {}
    n = len(f.segments)
    if semantics == "all":
        for name, idx in split.items():
            bad = first_out_of_range(idx, n)
            if bad is not None:
                raise DataError(f"{where}['{name}']: index {bad} out of range for {n} segments (_all indices point into the whole dataset list)")
            out[name] = np.asarray(idx, dtype=np.int64)
        return out
    # single: indices point into the list filtered to one subject; apply them to each subject.
    per_subject = {s: np.flatnonzero(f.subjects == s) for s in subjects}
    for name, idx in split.items():
        parts = []
        for s, positions in per_subject.items():
            bad = first_out_of_range(idx, len(positions))
            if bad is not None:
                raise DataError(
                    f"{where}['{name}']: index {bad} out of range for subject {s}'s {len(positions)} "
                    f"segments (_single indices point into one subject's list)"
                )
            parts.append(positions[np.asarray(idx, dtype=np.int64)])
        out[name] = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return out


def leakage(f: EEGImageNetFile, split_pos: dict[str, np.ndarray]) -> list[tuple[str, str, str]]:
    """(stem, split_a, split_b) for every image that appears in two splits."""
    owner: dict[int, str] = {}
    out = []
    for name in SPLITS:
        for img in np.unique(f.image_idx[split_pos.get(name, np.empty(0, dtype=np.int64))]):
            img = int(img)
            if img in owner and owner[img] != name:
                out.append((f.stems[img], owner[img], name))
            else:
                owner[img] = name
    return out


def length_bounds(cfg) -> tuple[int, int]:
    """Inclusive (low, high) bounds on T: the configured filter, raised so the window always fits."""
    window = cfg.resolved_window()
    low = max(cfg.min_length, window[1] if window is not None else 0)
    return low, cfg.max_length


def load_eeg_imagenet(cfg, check_images: bool = True) -> Recording:
    """Read an EEG-ImageNet-layout dataset per ``cfg`` (a ``DataConfig``) into a ``Recording``."""
    table = load_class_table(cfg.class_names)
    f = EEGImageNetFile(cfg.eeg, table)
    all_subjects = sorted(int(s) for s in np.unique(f.subjects))
    subjects = list(cfg.subjects) or all_subjects
    unknown = [s for s in subjects if s not in all_subjects]
    if unknown:
        raise DataError(f"data.subjects: subject {unknown[0]} not in {cfg.eeg} (has subjects {all_subjects})")
    window = cfg.resolved_window()
    low, high = length_bounds(cfg)
    keep = np.isin(f.subjects, subjects) & (f.lengths >= low) & (f.lengths <= high)
    notes = [f"length filter {low} <= T <= {high} (window {list(window) if window else 'all'}): "
             f"{int((~((f.lengths >= low) & (f.lengths <= high))).sum())} of {len(f.lengths)} segments dropped"]

    if cfg.splits is None:
        raise DataError("data.splits: not set (expected block_splits_by_image_all.pth or _single.pth)")
    semantics = split_semantics(cfg.splits, cfg.split_semantics)
    splits = read_split_file(cfg.splits)
    if cfg.split_num >= len(splits):
        raise DataError(f"data.split_num: {cfg.split_num} out of range ({cfg.splits} has {len(splits)} splits)")
    where = f"data.splits: {cfg.splits}: splits[{cfg.split_num}]"
    pos = map_split_indices(f, splits[cfg.split_num], semantics, subjects, where)
    leaks = leakage(f, pos)
    if leaks:
        stem, a, b = leaks[0]
        raise DataError(f"{where}: image '{stem}' is in both '{a}' and '{b}' ({len(leaks)} leaking images; splits must be by image)")
    split_idx = {name: np.unique(p[keep[p]]) for name, p in pos.items()}

    used = np.unique(np.concatenate(list(split_idx.values())))
    check_finite(f.segments, used, f"data.eeg: {cfg.eeg}", "dataset")
    for name, v in zip(RAW_KEYS, f.norm or ()):
        if window is not None and 1 < v.shape[1] < window[1]:
            raise DataError(f"data.eeg: {cfg.eeg}: '{name}' covers {v.shape[1]} samples, fewer than the window stop {window[1]}")

    image_paths: list[Optional[str]] = [None] * len(f.segments)
    if cfg.images is not None:
        root = cfg.images
        if check_images and not Path(root).is_dir():
            raise DataError(f"data.images: {root}: not a directory (expected <root>/<wnid>/<stem>.JPEG)")
        by_image = {int(i): f.image_path(root, int(i)) for i in np.unique(f.image_idx[used])}
        for j in used:
            image_paths[j] = by_image[int(f.image_idx[j])]
        if check_images:
            missing = image_missing(by_image.values())
            if missing:
                raise DataError(f"data.images: {len(missing)} of {len(by_image)} image files missing, e.g. {missing[0]}")

    return Recording(
        format="eeg-imagenet",
        source=str(cfg.eeg),
        segments=f.segments,
        labels=f.labels_idx,
        subjects=f.subjects,
        stems=[f.stems[i] for i in f.image_idx],
        image_paths=image_paths,
        class_ids=f.wnids,
        class_names=[table[w] for w in f.wnids],
        splits=split_idx,
        window=window,
        norm=f.norm,
        notes=notes + [f"split file {Path(cfg.splits).name} ({semantics} semantics), split {cfg.split_num}"],
    )

