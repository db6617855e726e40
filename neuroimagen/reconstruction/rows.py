"""The rows of stage 4: one row is one generated image, (subject, variant, test EEG trial, sample).

A variant (``eval.definitions``) is resolved here, once per row: :func:`build_rows` writes its ``init_kind``
(saliency | noise | gt), ``semantics`` (none | label | image | true_label | true_image) and ``eeg_source``
(own | other_class; the trial actually fed is ``eeg_item``) into the row, so that the batch callables read
what to do from the row itself and never look a variant up by name.

Every random draw of a row has its own seed, one per purpose (:data:`SEEDING`), derived from ``cfg.seed`` and the
trial (and sample) only, never from the variant or the batch:

* ``seed_z`` (trial): the saliency generator's noise z. All samples of one EEG trial, in every variant, share one
  saliency map (the paper polishes one saliency map per EEG with several diffusion samples);
* ``seed_noise`` (trial, sample): the diffusion noise, so the samples of a trial differ and every variant of
  (trial, sample) starts from the same noise (the variants are compared pairwise, not across different draws);
* ``seed_nway`` (trial, sample): the N-way ACC distractor draws, the same for every variant of (trial, sample);
* the other-class trial fed to the ``other_class`` EEG source (trial);
* ``seed_mismatch`` (trial): the other trial whose ground truth the suite's chance baselines score each
  generation against, the same for every sample and variant of the trial.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

from neuroimagen.config import RENAMED_VARIANTS, Config
from neuroimagen.errors import ConfigError, DataError
from neuroimagen.stages import SEMANTIC_STAGE, STAGE_ORDER

# one stream per purpose: the spawn key's first entry
PURPOSES = {"z": 0, "noise": 1, "nway": 2, "other_class": 3, "mismatch": 4}
# how the seeds are derived; part of the reconstruction fingerprint, so shards made with another seeding are never reused
SEEDING = ("numpy SeedSequence(entropy=seed, spawn_key=(purpose, trial[, sample])).generate_state(1, uint64) >> 1; "
           "purposes z (trial), noise (trial, sample), nway (trial, sample), other_class (trial), mismatch (trial)")


def derived_seed(seed: int, purpose: str, item: int, sample: Optional[int] = None) -> int:
    """The seed of one purpose (:data:`PURPOSES`) for a trial (and sample): an int in [0, 2**63), safe for an int64
    column and for ``torch.Generator.manual_seed``. Streams of different purposes, trials or samples are independent."""
    key = (PURPOSES[purpose], int(item)) + (() if sample is None else (int(sample),))
    state = np.random.SeedSequence(entropy=int(seed), spawn_key=key).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def row_seeds(seed: int, item: int, sample: int) -> dict[str, int]:
    """The ``seed_z`` / ``seed_noise`` / ``seed_nway`` / ``seed_mismatch`` columns of the row (trial ``item``,
    sample ``sample``); ``seed_mismatch`` picks the other trial's ground truth of the suite's chance baselines."""
    return {"seed_z": derived_seed(seed, "z", item), "seed_noise": derived_seed(seed, "noise", item, sample),
            "seed_nway": derived_seed(seed, "nway", item, sample), "seed_mismatch": derived_seed(seed, "mismatch", item)}


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
                    rng = np.random.default_rng(derived_seed(cfg.seed, "other_class", j))
                    eeg_item = others[int(rng.integers(len(others)))]
                for k in range(cfg.ldm.samples_per_eeg):
                    rows.append({
                        "subject": str(s), "variant": vname, "item": j, "eeg_item": eeg_item, "sample": k,
                        **row_seeds(cfg.seed, j, k), "stem": recording.stems[j], "label": labels[j],
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
