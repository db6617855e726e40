"""The rows of stage 4: one row is one generated image, (subject, variant, test EEG trial, sample).

A variant (``eval.definitions``) is resolved here, once per row: :func:`build_rows` writes its ``init_kind``
(saliency | noise | gt), ``semantics`` (none | label | image | true_label | true_image) and ``eeg_source``
(own | other_class; the trial actually fed is ``eeg_item``) into the row, so that the batch callables read
what to do from the row itself and never look a variant up by name.

Seeds depend on (seed, trial, sample) only, so every variant of a trial starts from the same noise: the
variants are compared pairwise, not across different draws.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

from neuroimagen.config import RENAMED_VARIANTS, Config
from neuroimagen.errors import ConfigError, DataError
from neuroimagen.stages import SEMANTIC_STAGE, STAGE_ORDER


def row_seed(seed: int, item: int, sample: int) -> int:
    """Per-image seed shared by all variants of (trial, sample)."""
    return int((seed * 1_000_003 + item * 7919 + sample * 104_729 + 17) % (2**31 - 1))


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9+._-]", "_", name)


def needed_stages(cfg: Config, variants: Sequence[str]) -> list[str]:
    """Trained stages the requested variants read."""
    need = set()
    for name in variants:
        v = cfg.eval.variant(name)
        if v.init == "saliency":
            need.update({"encoder", "saliency"})
        if v.semantics in SEMANTIC_STAGE:
            need.add(SEMANTIC_STAGE[v.semantics])
    return [s for s in STAGE_ORDER if s in need]


def select_variants(cfg: Config, requested: Optional[Sequence[str]]) -> list[str]:
    names = [d.name for d in cfg.eval.definitions]
    chosen = list(requested) if requested else list(cfg.eval.variants)
    bad = [v for v in chosen if v not in names]
    if bad and bad[0] in RENAMED_VARIANTS:
        raise ConfigError(f"--variants: variant '{bad[0]}' was renamed '{RENAMED_VARIANTS[bad[0]]}' (the EEG of another "
                          f"class's trial: a control; chance is k/N)")
    if bad:
        raise ConfigError(f"--variants: unknown variant '{bad[0]}' (defined: {', '.join(names)})")
    return chosen


def build_rows(cfg: Config, recording, variants: Sequence[str], subjects: Optional[Sequence[int]] = None) -> list[dict]:
    """Every (subject, variant, trial, sample) of the evaluation split, in a fixed order, each row carrying its
    variant's ``init_kind`` / ``semantics`` / ``eeg_source``."""
    ec = cfg.eval
    idx = recording.splits.get(ec.split)
    if idx is None:
        raise DataError(f"{recording.source}: no '{ec.split}' split to reconstruct")
    subs = recording.subjects[idx]
    present = sorted(set(int(s) for s in subs))
    wanted = list(subjects) if subjects else (list(ec.subjects) if ec.subjects else present)
    missing = [s for s in wanted if s not in present]
    if missing:
        raise ConfigError(f"--subjects: subject {missing[0]} has no trials in the '{ec.split}' split "
                          f"(present: {', '.join(map(str, present))})")
    rows = []
    for s in wanted:
        trials = [int(j) for j in idx[subs == s]]
        if ec.max_trials is not None:
            trials = trials[: ec.max_trials]
        labels = {j: int(recording.labels[j]) for j in trials}
        for vname in variants:
            v = ec.variant(vname)
            for j in trials:
                eeg_item = j
                if v.eeg == "other_class":
                    others = [k for k in trials if labels[k] != labels[j]]
                    if not others:
                        raise DataError(f"variant '{vname}': subject {s} has no trial of another class in the "
                                        f"'{ec.split}' split")
                    rng = np.random.default_rng([cfg.seed, j, 991])
                    eeg_item = others[int(rng.integers(len(others)))]
                for k in range(cfg.ldm.samples_per_eeg):
                    rows.append({
                        "subject": str(s), "variant": vname, "item": j, "eeg_item": eeg_item, "sample": k,
                        "seed": row_seed(cfg.seed, j, k), "stem": recording.stems[j], "label": labels[j],
                        "class_name": recording.class_names[labels[j]],
                        "gt": recording.image_paths[j] or "",
                        "init_kind": v.init, "semantics": v.semantics, "eeg_source": v.eeg,
                    })
    return rows


def rows_to_batch(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    """A list of row dicts -> a column batch (the format Ray Data hands to the callables)."""
    out = {}
    for k in rows[0]:
        vals = [r[k] for r in rows]
        out[k] = np.asarray(vals, dtype=object) if isinstance(vals[0], str) else np.asarray(vals)
    return out
