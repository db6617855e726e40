"""THINGS-EEG2 (Gifford et al. 2022) reader: both the 17x100 release and the 63x250 NICE/ATM variant.

Layout (``data.eeg`` is the folder holding the subjects, ``data.images`` the image set)::

    <eeg>/sub-01/preprocessed_eeg_training.npy   dict: preprocessed_eeg_data [N_train_img, R, C, T],
    <eeg>/sub-01/preprocessed_eeg_test.npy             ch_names (C), times (T)
    <images>/training_images/00001_aardvark/aardvark_01b.jpg   (concept folders, sorted; images sorted)
    <images>/test_images/00001_aircraft_carrier/aircraft_carrier_06s.jpg

EEG rows follow the sorted image order (concept-major). C and T are read from the file, never
assumed. Training images yield train + val (the last ``things_val_per_concept`` images of every
concept are validation); the test file is the test split. In the real data the 200 test concepts
are disjoint from the 1654 training concepts (evaluation is zero-shot); labels index the union,
training concepts first, so a test label has no training image. Repetitions: the test split's are
averaged by default (``data.test_repetitions: average``, one segment per test image and subject, as
NICE/ATM evaluate; ``each`` keeps one segment per repetition), the training split's by
``data.things_average_repetitions``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from neuroimagen.data.recording import Recording
from neuroimagen.errors import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
SUBJECT_RE = re.compile(r"^sub-(\d+)$")
CONCEPT_RE = re.compile(r"^(\d+)_(.+)$")
FILES = {"train": "preprocessed_eeg_training.npy", "test": "preprocessed_eeg_test.npy"}


def load_trusted_npy_dict(path: str | os.PathLike, key: str) -> dict:
    """Load a THINGS-EEG2 ``.npy`` that stores a pickled dict.

    This is the one place in neuroimagen that unpickles: ``np.load(..., allow_pickle=True)`` can
    run code embedded in the file, so it is for trusted input only: files from the official release or
    written by ``neuroimagen data synth``. Everything else reads with ``weights_only=True`` or plain formats.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{key}: {p}: file not found")
    try:
        obj = np.load(p, allow_pickle=True)
        if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
            obj = obj.item()
    except Exception as exc:  # noqa: BLE001 - numpy/pickle raise many types for a bad file
        raise DataError(f"{key}: {p}: cannot read as a .npy dict (truncated or corrupt: {exc.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{key}: {p}: expected a pickled dict with 'preprocessed_eeg_data', got {type(obj).__name__}")
    return obj


def read_things_file(path: Path, key: str = "data.eeg") -> tuple[np.ndarray, list[str], np.ndarray]:
    """(data [N, R, C, T] float32, ch_names, times) from one preprocessed file, validated."""
    obj = load_trusted_npy_dict(path, key)
    where = f"{key}: {path}"
    for k in ("preprocessed_eeg_data", "ch_names", "times"):
        if k not in obj:
            raise DataError(f"{where}: missing key '{k}' (expected 'preprocessed_eeg_data', 'ch_names', 'times')")
    data = obj["preprocessed_eeg_data"]
    if not isinstance(data, np.ndarray) or not np.issubdtype(data.dtype, np.floating):
        raise DataError(f"{where}: 'preprocessed_eeg_data': expected a float array, got {type(data).__name__}"
                        + (f" of {data.dtype}" if isinstance(data, np.ndarray) else ""))
    if data.ndim != 4:
        raise DataError(f"{where}: 'preprocessed_eeg_data': expected 4-D [images, repetitions, channels, time], got shape {data.shape}")
    n, r, c, t = data.shape
    if min(data.shape) == 0:
        raise DataError(f"{where}: 'preprocessed_eeg_data': expected at least one image, repetition, channel and "
                        f"sample, got shape {data.shape}")
    ch = obj["ch_names"]
    if isinstance(ch, np.ndarray):
        ch = ch.tolist() if ch.ndim == 1 else None
    if not isinstance(ch, (list, tuple)) or not all(isinstance(x, str) for x in ch):
        raise DataError(f"{where}: 'ch_names': expected a list of {c} channel name strings, "
                        f"got {type(obj['ch_names']).__name__}")
    ch = [str(x) for x in ch]  # plain str (numpy's str_ too), so the inspect report is JSON
    if len(ch) != c:
        raise DataError(f"{where}: 'ch_names' has {len(ch)} names for {c} channels")
    try:
        times = np.asarray(obj["times"])
    except (ValueError, TypeError):  # a ragged list
        times = None
    if times is None or times.ndim != 1 or len(times) != t or times.dtype == bool or not (
            np.issubdtype(times.dtype, np.integer) or np.issubdtype(times.dtype, np.floating)):
        shown = f"shape {times.shape} of {times.dtype}" if times is not None else "a ragged list"
        raise DataError(f"{where}: 'times': expected {t} sample times (a 1-D array of numbers), got {shown}")
    if not np.isfinite(data).all():
        bad = int(np.argwhere(~np.isfinite(data))[0][0])
        raise DataError(f"{where}: 'preprocessed_eeg_data'[{bad}] contains NaN or Inf (expected finite values)")
    return data, ch, times


def list_concepts(root: Path, which: str) -> list[tuple[str, list[Path]]]:
    """[(concept folder, sorted image files)] of ``<root>/<which>_images``, sorted by folder."""
    base = root / f"{which}_images"
    if not base.is_dir():
        raise DataError(f"data.images: {base}: not a directory (expected THINGS {which}_images/<NNNNN_concept>/)")
    out = []
    for d in sorted(p for p in base.iterdir() if p.is_dir()):
        if not CONCEPT_RE.match(d.name):
            raise DataError(f"data.images: {d}: concept folder name must look like '00001_aardvark'")
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise DataError(f"data.images: {d}: no images in concept folder")
        out.append((d.name, files))
    if not out:
        raise DataError(f"data.images: {base}: no concept folders")
    return out


def concept_name(folder: str) -> str:
    """'00001_aircraft_carrier' -> 'aircraft carrier'."""
    m = CONCEPT_RE.match(folder)
    return (m.group(2) if m else folder).replace("_", " ")


def find_subjects(root: Path) -> list[int]:
    if not root.is_dir():
        raise DataError(f"data.eeg: {root}: not a directory (expected the folder holding sub-01/, sub-02/, ...)")
    subs = sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := SUBJECT_RE.match(p.name)))
    if not subs:
        raise DataError(f"data.eeg: {root}: no sub-XX folders (expected sub-01/preprocessed_eeg_training.npy, ...)")
    return subs


def load_things_eeg(cfg, check_images: bool = True) -> Recording:  # noqa: ARG001 - images are always listed
    """Read a THINGS-EEG2-layout dataset per ``cfg`` (a ``DataConfig``) into a ``Recording``."""
    root = Path(cfg.eeg)
    available = find_subjects(root)
    subjects = list(cfg.subjects) or available
    unknown = [s for s in subjects if s not in available]
    if unknown:
        raise DataError(f"data.subjects: subject {unknown[0]} not in {root} (has subjects {available})")
    if cfg.images is None:
        raise DataError("data.images: not set (things-eeg needs the image set to know each row's concept)")
    img_root = Path(cfg.images)
    concepts = {which: list_concepts(img_root, which) for which in ("training", "test")}

    # Label space: training concepts in folder order, then test concepts not seen in training.
    class_ids: list[str] = []
    names: list[str] = []
    label_of_name: dict[str, int] = {}
    for which in ("training", "test"):
        for folder, _ in concepts[which]:
            nm = concept_name(folder)
            if nm not in label_of_name:
                label_of_name[nm] = len(names)
                names.append(nm)
                class_ids.append(folder)
    rows = {}
    for which, split in (("training", "train"), ("test", "test")):
        imgs, labs = [], []
        for folder, files in concepts[which]:
            imgs.extend(files)
            labs.extend([label_of_name[concept_name(folder)]] * len(files))
        rows[split] = (imgs, np.asarray(labs, dtype=np.int64))
    overlap = {p.stem for p in rows["train"][0]} & {p.stem for p in rows["test"][0]}
    if overlap:
        raise DataError(f"data.images: {img_root}: image '{sorted(overlap)[0]}' is in both training_images and test_images")

    segments: list = []
    labels, subs, stems, paths = [], [], [], []
    split_idx: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    shape_ref: Optional[tuple[int, int]] = None
    for s in subjects:
        for split, fname in FILES.items():
            path = root / f"sub-{s:02d}" / fname
            data, _, _ = read_things_file(path)
            imgs, labs = rows[split]
            if data.shape[0] != len(imgs):
                raise DataError(
                    f"data.eeg: {path}: {data.shape[0]} EEG rows but {len(imgs)} images in "
                    f"{img_root / ('training' if split == 'train' else 'test')}_images (expected one row per image, sorted order)"
                )
            if shape_ref is None:
                shape_ref = data.shape[2:]
            elif data.shape[2:] != shape_ref:
                raise DataError(f"data.eeg: {path}: channels x time {data.shape[2:]} differ from {shape_ref} of the first file")
            # the field averages the test repetitions (data.test_repetitions); training ones are averaged or kept
            average = cfg.test_repetitions == "average" if split == "test" else cfg.things_average_repetitions
            if average:
                # float64 accumulator: a float32 sum of large (finite) repetitions would overflow to Inf
                arr = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1, dtype=np.float64), dtype=np.float32))  # (N, C, T)
                views = [(i, arr[i]) for i in range(arr.shape[0])]
            else:
                arr = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))  # (N, R, C, T)
                views = [(i, arr[i, r]) for i in range(arr.shape[0]) for r in range(arr.shape[1])]
            # Validation images: the last k images of every training concept (split by image).
            val_rows: set[int] = set()
            if split == "train" and cfg.things_val_per_concept:
                start = 0
                for _, files in concepts["training"]:
                    k = min(cfg.things_val_per_concept, len(files) - 1)
                    val_rows.update(range(start + len(files) - k, start + len(files)))
                    start += len(files)
            for i, x in views:
                j = len(segments)
                segments.append(x)
                labels.append(int(labs[i]))
                subs.append(s)
                stems.append(imgs[i].stem)
                paths.append(str(imgs[i]))
                split_idx["val" if i in val_rows else split].append(j)
    window = cfg.resolved_window()
    if window is not None and shape_ref is not None and window[1] > shape_ref[1]:
        raise DataError(f"data.window: stop {window[1]} beyond the {shape_ref[1]} samples in {root}")
    return Recording(
        format="things-eeg",
        source=str(root),
        segments=segments,
        labels=np.asarray(labels, dtype=np.int64),
        subjects=np.asarray(subs, dtype=np.int64),
        stems=stems,
        image_paths=paths,
        class_ids=class_ids,
        class_names=names,
        splits={k: np.asarray(v, dtype=np.int64) for k, v in split_idx.items()},
        window=window,
        notes=[f"training repetitions {'averaged' if cfg.things_average_repetitions else 'kept as separate segments'}; "
               f"test repetitions {'averaged' if cfg.test_repetitions == 'average' else 'kept as separate segments'}; "
               f"validation = last {cfg.things_val_per_concept} training image(s) of each concept"],
    )
