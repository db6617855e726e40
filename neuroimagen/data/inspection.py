"""``neuroimagen data inspect``: what is in a downloaded (or synthesised) dataset, and what is wrong.

Structural faults (unreadable file, missing keys, wrong rank) raise ``DataError`` like the readers
do. Content problems a user should know about before training (leakage between splits, missing
images, non-finite EEG, split indices out of range, label/image mismatches) are collected into
``report['problems']`` instead, so one run lists all of them.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from neuroimagen.data.eeg_imagenet import (
    EEGImageNetFile,
    leakage,
    length_bounds,
    load_class_table,
    map_split_indices,
    read_split_file,
    split_semantics,
)
from neuroimagen.data.recording import is_finite
from neuroimagen.data.things_eeg import FILES, concept_name, find_subjects, list_concepts, read_things_file
from neuroimagen.errors import DataError

EEG_IMAGENET_SPLIT_FILES = ("block_splits_by_image_all.pth", "block_splits_by_image_single.pth")


def detect_format(path: str) -> str:
    """'eeg-imagenet' for a .pth file, 'things-eeg' for a folder of sub-XX/ (or one of its .npy)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: not found")
    if p.is_file():
        if p.suffix == ".pth":
            return "eeg-imagenet"
        if p.suffix == ".npy":
            return "things-eeg"
        raise DataError(f"{p}: cannot tell the format from the file (expected an EEG-ImageNet .pth or a THINGS-EEG2 folder); pass --format")
    if any(c.is_dir() and c.name.startswith("sub-") for c in p.iterdir()):
        return "things-eeg"
    pths = sorted(c.name for c in p.glob("eeg_*.pth"))
    if pths:
        raise DataError(f"{p}: is a folder; pass one EEG-ImageNet file, e.g. {p / pths[0]} (found: {', '.join(pths)})")
    raise DataError(f"{p}: no EEG-ImageNet .pth file and no THINGS-EEG2 sub-XX/ folders found")


def _dist(values: np.ndarray) -> dict:
    if values.size == 0:
        return {}
    q = np.percentile(values, [0, 5, 50, 95, 100])
    return {"min": int(q[0]), "p5": round(float(q[1]), 1), "median": round(float(q[2]), 1),
            "p95": round(float(q[3]), 1), "max": int(q[4])}


def _counts(values) -> dict:
    return {str(k): int(v) for k, v in sorted(Counter(int(x) for x in values).items())}


def inspect_eeg_imagenet(cfg) -> dict:
    """Report on an EEG-ImageNet-layout file per ``cfg`` (a DataConfig; splits/images optional)."""
    f = EEGImageNetFile(cfg.eeg, load_class_table(cfg.class_names))
    problems: list[str] = []
    low, high = length_bounds(cfg)
    n = len(f.segments)
    finite = np.array([is_finite(x) for x in f.segments], dtype=bool)
    if not finite.all():
        problems.append(f"{int((~finite).sum())} segments contain NaN/Inf, e.g. dataset[{int(np.flatnonzero(~finite)[0])}]")
    mismatch = [i for i in range(n) if f.stems[f.image_idx[i]].split("_")[0] != f.wnids[f.labels_idx[i]]]
    if mismatch:
        problems.append(f"{len(mismatch)} segments whose image WNID differs from their label, e.g. dataset[{mismatch[0]}]")
    keep_len = (f.lengths >= low) & (f.lengths <= high)
    subjects = sorted(int(s) for s in np.unique(f.subjects))
    report: dict = {
        "format": "eeg-imagenet",
        "file": str(cfg.eeg),
        "variant": "raw (z-scored with its means/stddevs)" if f.is_raw else "standardised (_std)",
        "segments": n,
        "channels": f.n_channels,
        "classes": len(f.wnids),
        "images_listed": len(f.stems),
        "images_used": int(np.unique(f.image_idx).size),
        "subjects": _counts(f.subjects),
        "segments_per_class": {f"{i} {f.wnids[i]}": c for i, c in ((int(k), v) for k, v in _counts(f.labels_idx).items())},
        "T": _dist(f.lengths),
        "length_filter": {"keep": f"{low} <= T <= {high}", "kept": int(keep_len.sum()),
                          "too_short": int((f.lengths < low).sum()), "too_long": int((f.lengths > high).sum())},
        "nonfinite_segments": int((~finite).sum()),
    }

    split_path = cfg.splits
    if split_path is None:
        found = [Path(cfg.eeg).parent / s for s in EEG_IMAGENET_SPLIT_FILES if (Path(cfg.eeg).parent / s).is_file()]
        split_path = str(found[0]) if found else None
    if split_path is not None:
        semantics = split_semantics(split_path, cfg.split_semantics)
        splits = read_split_file(split_path)
        chosen = list(cfg.subjects) or subjects
        rows = []
        for k, sp in enumerate(splits):
            row: dict = {"split": k}
            try:
                pos = map_split_indices(f, sp, semantics, chosen, f"splits[{k}]")
            except DataError as exc:
                problems.append(str(exc))
                row["error"] = str(exc)
                rows.append(row)
                continue
            for name, p in pos.items():
                row[name] = int(p.size)
                row[f"{name}_kept"] = int(keep_len[p].sum())
            leaks = leakage(f, pos)
            row["leaking_images"] = len(leaks)
            if leaks:
                problems.append(f"splits[{k}]: {len(leaks)} images in two splits, e.g. '{leaks[0][0]}' in '{leaks[0][1]}' and '{leaks[0][2]}'")
            rows.append(row)
        report["splits"] = {"file": split_path, "semantics": semantics, "per_split": rows}
    else:
        report["splits"] = "not checked (pass --splits FILE)"

    if cfg.images is not None:
        root = Path(cfg.images)
        if not root.is_dir():
            problems.append(f"images root {root} is not a directory")
            report["images"] = {"root": str(root), "missing": len(np.unique(f.image_idx))}
        else:
            used = np.unique(f.image_idx)
            missing = [f.image_path(str(root), int(i)) for i in used if not Path(f.image_path(str(root), int(i))).is_file()]
            report["images"] = {"root": str(root), "checked": int(used.size), "missing": len(missing),
                                "missing_examples": missing[:5]}
            if missing:
                problems.append(f"{len(missing)} of {used.size} images missing, e.g. {missing[0]}")
    else:
        report["images"] = "not checked (pass --images DIR)"
    report["problems"] = problems
    return report


def inspect_things_eeg(cfg) -> dict:
    """Report on a THINGS-EEG2-layout folder per ``cfg`` (images optional)."""
    root = Path(cfg.eeg)
    if root.is_file():
        root = root.parent.parent if root.parent.name.startswith("sub-") else root.parent
    problems: list[str] = []
    subjects = find_subjects(root)
    concepts = None
    if cfg.images is not None:
        try:
            concepts = {w: list_concepts(Path(cfg.images), w) for w in ("training", "test")}
        except DataError as exc:
            problems.append(str(exc))
    per_subject = {}
    for s in subjects:
        entry = {}
        for split, fname in FILES.items():
            path = root / f"sub-{s:02d}" / fname
            if not path.is_file():
                problems.append(f"sub-{s:02d}: {fname} missing")
                continue
            data, ch, times = read_things_file(path)
            entry[split] = {"images": data.shape[0], "repetitions": data.shape[1], "channels": data.shape[2],
                            "times": data.shape[3], "t_range_s": [float(times[0]), float(times[-1])],
                            "dtype": str(data.dtype)}
            entry["ch_names"] = ch[:6] + (["..."] if len(ch) > 6 else [])
            if concepts is not None:
                n_img = sum(len(files) for _, files in concepts["training" if split == "train" else "test"])
                if n_img != data.shape[0]:
                    problems.append(f"sub-{s:02d}/{fname}: {data.shape[0]} EEG rows but {n_img} images")
        per_subject[f"sub-{s:02d}"] = entry
    report: dict = {"format": "things-eeg", "folder": str(root), "subjects": per_subject}
    if concepts is not None:
        report["images"] = {
            w: {"concepts": len(c), "images": sum(len(files) for _, files in c),
                "examples": [concept_name(folder) for folder, _ in c[:3]]}
            for w, c in concepts.items()
        }
        shared = {concept_name(a) for a, _ in concepts["training"]} & {concept_name(a) for a, _ in concepts["test"]}
        report["images"]["concepts_in_both"] = len(shared)
    else:
        report["images"] = "not checked (pass --images DIR)"
    report["problems"] = problems
    return report


def inspect_dataset(path: str, fmt: Optional[str], splits: Optional[str], images: Optional[str], base_cfg) -> dict:
    """Inspect ``path``; options left as None fall back to ``base_cfg`` (a DataConfig)."""
    fmt = fmt or detect_format(path)
    cfg = dataclasses.replace(base_cfg, format=fmt, eeg=str(path),
                              splits=splits if splits is not None else (base_cfg.splits if fmt == "eeg-imagenet" else None),
                              images=images if images is not None else base_cfg.images)
    if fmt == "things-eeg" and cfg.images is None:
        guess = (Path(path) if Path(path).is_dir() else Path(path).parent) / "image_set"
        if guess.is_dir():
            cfg = dataclasses.replace(cfg, images=str(guess))
    return inspect_eeg_imagenet(cfg) if fmt == "eeg-imagenet" else inspect_things_eeg(cfg)


def render_report(report: dict) -> str:
    """Human-readable text of an inspection report."""
    lines = []

    def emit(key, value, indent=0):
        pad = "  " * indent
        if isinstance(value, dict):
            if all(not isinstance(v, (dict, list)) for v in value.values()) and len(value) <= 8:
                lines.append(f"{pad}{key}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
            else:
                lines.append(f"{pad}{key}:")
                for k, v in value.items():
                    emit(k, v, indent + 1)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{pad}{key}:")
            for v in value:
                lines.append(f"{pad}  - " + ", ".join(f"{k}={x}" for k, x in v.items()))
        else:
            lines.append(f"{pad}{key}: {value}")

    for k, v in report.items():
        if k != "problems":
            emit(k, v)
    probs = report.get("problems", [])
    lines.append("problems: none" if not probs else f"problems ({len(probs)}):")
    lines.extend(f"  - {p}" for p in probs)
    return "\n".join(lines)
