"""Retrieval of the evaluated concepts from stage 3's predicted caption embedding: ``neuroimagen retrieval``.

For each EEG trial of the evaluation split (on THINGS-EEG2 its test repetitions are averaged by the reader,
``data.test_repetitions``), the stage-3 label regressor predicts the caption embedding of "An image of
<concept>"; the *gallery* is the text encoder's embedding of that caption for every concept of the split,
never only a batch's. Both are compared in the regressor's standardised target space (the training targets'
mean and std per element: the space it was trained in, where no few huge channels dominate), by cosine
similarity, and scored with :func:`~neuroimagen.metrics.retrieval.retrieval_accuracy`: k-way top-1 and top-5
for k = 2, 4, 10, 50, 100, 200 (capped at the gallery size), seeded distractor draws, chance m / k.

Beside every number, the control with the EEG permuted across the trials (seeded): it must sit at chance.
The protocol says whether it is zero-shot: when no evaluated concept has a training trial (THINGS-EEG2's
test concepts), the regressor never saw them, so retrieving them is zero-shot by construction; on EEG-ImageNet
the test classes are the training ones (class retrieval, not zero-shot).

Writes ``RUN/results/retrieval.csv`` (one row per subject, control, k, top; ``protocol`` is ``within``, or
``loso`` in a leave-one-subject-out fold, ``data.holdout_subject``) and ``RUN/results/retrieval.json``
(the protocol), both atomically. Needs the trained ``semantic`` stage; no diffusion model, no classifier.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import pandas as pd
import torch

from neuroimagen.atomic import atomic_path, write_text
from neuroimagen.config import Config
from neuroimagen.data.captions import label_caption
from neuroimagen.data.datasets import load_splits
from neuroimagen.errors import ConfigError, DataError
from neuroimagen.logs import get_logger
from neuroimagen.metrics.retrieval import DEFAULT_TOPS, DEFAULT_WAYS, cosine_similarity, retrieval_accuracy
from neuroimagen.provenance import provenance
from neuroimagen.reconstruction.factory import load_module, stage_models
from neuroimagen.runs.training import prepare_data, read_run
from neuroimagen.stages.semantic import text_encoder_for

DRAWS = 100  # distractor draws per EEG and (k, top), below the gallery size
_log = get_logger(__name__)


def _shuffled(n: int, seed: int) -> torch.Tensor:
    """A seeded permutation of n trials that moves every trial (a derangement by rotation of a permutation)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out = torch.empty_like(perm)
    out[perm] = perm.roll(1)
    return out


def semantic_retrieval(cfg: Config, run_dir: str | Path, subjects: Optional[Sequence[int]] = None,
                       log: Optional[Callable[[str], None]] = None) -> pd.DataFrame:
    """Score the retrieval (module docstring); returns the table written to ``results/retrieval.csv``."""
    log = log or _log.info
    run_dir = Path(run_dir).resolve()
    record = read_run(run_dir)
    if "semantic" not in record["stages"]:
        raise ConfigError(f"{run_dir}: retrieval needs the trained stage-3 label regressor; run "
                          f"`neuroimagen train --out {run_dir} --stages semantic` first")
    regressor, _ = load_module(stage_models(run_dir, record, ["semantic"])["semantic"], "regressor")
    regressor.eval()
    cfg = prepare_data(cfg, run_dir, log)
    splits = load_splits(cfg.data, image_mode="none")
    ds = splits[cfg.eval.split]
    rec = ds.recording
    labels, subj = ds.labels, ds.subjects
    if len(ds) == 0:
        raise DataError(f"{cfg.eval.split} split: no trials to retrieve")
    concepts = sorted(set(labels.tolist()))
    seen = set(splits["train"].labels.tolist())
    unseen = [c for c in concepts if c not in seen]
    te = text_encoder_for(cfg, run_dir)
    with torch.no_grad():
        mean, std = regressor.target_mean, regressor.target_std
        gallery = ((te.encode([label_caption(rec.class_names[c]) for c in concepts]) - mean) / std).flatten(1)
        pred = regressor.forward_standardised(ds.eeg_tensor()).flatten(1)  # (N, L*E), standardised
    target = torch.tensor([concepts.index(int(c)) for c in labels])
    wanted = sorted({int(s) for s in subj.tolist()}) if subjects is None else [int(s) for s in subjects]
    rows = []
    for s in [*map(str, wanted), "all"]:
        keep = torch.ones(len(ds), dtype=torch.bool) if s == "all" else subj == int(s)
        if not bool(keep.any()):
            raise DataError(f"--subjects: subject {s} has no trials in the {cfg.eval.split} split")
        p, t = pred[keep], target[keep]
        for control, q in (("eeg", p), ("shuffled", p[_shuffled(len(p), cfg.seed + 53)])):
            if len(p) < 2 and control == "shuffled":
                continue
            for r in retrieval_accuracy(cosine_similarity(q, gallery), t, DEFAULT_WAYS, DEFAULT_TOPS, DRAWS, cfg.seed):
                rows.append({"protocol": "within" if cfg.data.holdout_subject is None else "loso",
                             "subject": s, "control": control, **r})
    table = pd.DataFrame(rows)
    protocol = {
        "what": "k-way top-m retrieval of each evaluated EEG trial's concept from stage 3's predicted label-caption "
                "embedding ('An image of <concept>')",
        "split": cfg.eval.split, "n_trials": len(ds), "gallery": len(concepts),
        "zero_shot": len(unseen) == len(concepts),
        "unseen_concepts": len(unseen),
        "note": ("zero-shot: no evaluated concept has a training trial" if len(unseen) == len(concepts) else
                 f"not zero-shot: {len(concepts) - len(unseen)} of {len(concepts)} evaluated concepts have training "
                 "trials (class retrieval)"),
        "similarity": "cosine similarity of flattened (L, E) embeddings, both standardised by the regressor's "
                      "training-target mean and std per element",
        "gallery_definition": "the text encoder's embedding of the label caption of every concept in the split",
        "ways": list(DEFAULT_WAYS), "tops": list(DEFAULT_TOPS), "draws": DRAWS, "seed": cfg.seed,
        "control": f"shuffled: the predictions permuted across the trials (a derangement, seed {cfg.seed + 53})",
        "repetitions": ("THINGS-EEG2 test repetitions: " + str(getattr(cfg.data, "test_repetitions", "average"))
                        if cfg.data.format == "things-eeg" else "one trial per image presentation"),
        "text_encoder": te.identity, "regressor": str(stage_models(run_dir, record, ["semantic"])["semantic"]),
        "provenance": provenance(),
    }
    res = run_dir / "results"
    with atomic_path(res / "retrieval.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    write_text(res / "retrieval.json", json.dumps(protocol, indent=1, default=str))
    top = table[(table["subject"] == "all") & (table["control"] == "eeg") & (table["top"] == 1)]
    if len(top):
        best = top.iloc[-1]
        log(f"retrieval: {int(best['k'])}-way top-1 {100 * best['accuracy']:.1f} % (chance "
            f"{100 * best['chance']:.1f} %) over {len(ds)} trials, {protocol['note']} -> {res / 'retrieval.csv'}")
    return table

