"""Zero-shot retrieval from the trained EEG embeddings: ``neuroimagen retrieval``.

Two embeddings are scored, each when its stage is trained (the ``embedding`` column of the table):

* ``caption``: the evaluated concepts retrieved from stage 3's predicted caption embedding (below);
* ``clip_image``: the evaluated *images* retrieved from stage ``clip_image``'s EEG embedding: each EEG trial
  (test repetitions averaged by the reader, as for the caption) ranks the gallery of the CLIP image embeddings
  (``stages.clip_image.clip_vision``, the vision model the stage was trained against: its weight fingerprint is
  checked) of every distinct image of the split, centred on the training images' mean embedding as in training;
  cosine similarity, the same k-way top-1 / top-5 protocol, chance and shuffled-EEG control (NICE / ATM on
  THINGS-EEG2, where the 200 test images are one per test concept).

Caption embedding:

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

Writes ``RUN/results/retrieval.csv`` (one row per embedding, subject, control, k, top; ``protocol`` is ``within``,
or ``loso`` in a leave-one-subject-out fold, ``data.holdout_subject``; ``embedding`` is ``caption`` or
``clip_image``) and ``RUN/results/retrieval.json`` (the protocol: the caption's at the top level, as before, and
every scored embedding's under ``embeddings``), both atomically. Needs the trained ``semantic`` or ``clip_image``
stage; no diffusion model, no classifier.
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
from neuroimagen.stages.clip_image import clip_vision_for, embed_images, split_images
from neuroimagen.stages.semantic import text_encoder_for

DRAWS = 100  # distractor draws per EEG and (k, top), below the gallery size
EMBEDDINGS = {"caption": "semantic", "clip_image": "clip_image"}  # embedding -> the stage that makes it
_log = get_logger(__name__)


def _shuffled(n: int, seed: int) -> torch.Tensor:
    """A seeded permutation of n trials that moves every trial (a derangement by rotation of a permutation)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out = torch.empty_like(perm)
    out[perm] = perm.roll(1)
    return out


def _caption(cfg: Config, run_dir: Path, record: dict, ds, rec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(queries (N, D), gallery (G, D), true gallery index (N,), protocol) of stage 3's caption embedding."""
    model_dir = stage_models(run_dir, record, ["semantic"])["semantic"]
    regressor, _ = load_module(model_dir, "regressor")
    labels = ds.labels
    concepts = sorted(set(labels.tolist()))
    te = text_encoder_for(cfg, run_dir)
    with torch.no_grad():
        mean, std = regressor.target_mean, regressor.target_std
        gallery = ((te.encode([label_caption(rec.class_names[c]) for c in concepts]) - mean) / std).flatten(1)
        pred = regressor.forward_standardised(ds.eeg_tensor()).flatten(1)  # (N, L*E), standardised
    target = torch.tensor([concepts.index(int(c)) for c in labels])
    return pred, gallery, target, {
        "what": "k-way top-m retrieval of each evaluated EEG trial's concept from stage 3's predicted label-caption "
                "embedding ('An image of <concept>')",
        "gallery": len(concepts),
        "similarity": "cosine similarity of flattened (L, E) embeddings, both standardised by the regressor's "
                      "training-target mean and std per element",
        "gallery_definition": "the text encoder's embedding of the label caption of every concept in the split",
        "text_encoder": te.identity, "regressor": str(model_dir)}


def _clip_image(cfg: Config, run_dir: Path, record: dict, ds, rec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(queries (N, P), gallery (G, P), true gallery index (N,), protocol) of stage clip_image's embedding."""
    model_dir = stage_models(run_dir, record, ["clip_image"])["clip_image"]
    model, spec = load_module(model_dir, "clip_eeg")
    fn, fingerprint = clip_vision_for(cfg)
    trained = spec.get("targets", {})
    if trained.get("clip_vision_fingerprint") != fingerprint:
        raise ConfigError(f"stages.clip_image.clip_vision: {fn.identity} ({fingerprint}) is not the vision model stage "
                          f"clip_image was trained against ({trained.get('clip_vision')}, "
                          f"{trained.get('clip_vision_fingerprint')}); set it back, or retrain the stage")
    stems, paths = split_images(ds)
    where = {s: i for i, s in enumerate(stems)}
    with torch.no_grad():
        gallery = model.image_space(embed_images(fn, paths))  # (G, P)
        pred = model(ds.eeg_tensor())  # (N, P)
    target = torch.tensor([where[s] for s in ds.stems])
    return pred, gallery, target, {
        "what": "k-way top-m retrieval of each evaluated EEG trial's image from stage clip_image's EEG embedding "
                "(aligned to CLIP image embeddings by a symmetric InfoNCE, as NICE / ATM)",
        "gallery": len(stems),
        "similarity": "cosine similarity of the EEG embedding and the CLIP image embedding"
                      + (", both in the space the stage was trained in (images minus the training images' mean "
                         "embedding)" if trained.get("center") else ""),
        "gallery_definition": "the CLIP image embedding of every distinct image of the split",
        "clip_vision": fn.identity, "clip_vision_fingerprint": fingerprint, "model": str(model_dir)}


def semantic_retrieval(cfg: Config, run_dir: str | Path, subjects: Optional[Sequence[int]] = None,
                       log: Optional[Callable[[str], None]] = None) -> pd.DataFrame:
    """Score the retrieval of every trained embedding (module docstring); returns the table written to
    ``results/retrieval.csv``."""
    log = log or _log.info
    run_dir = Path(run_dir).resolve()
    record = read_run(run_dir)
    scored = [e for e, stage in EMBEDDINGS.items() if stage in record["stages"]]
    if not scored:
        raise ConfigError(f"{run_dir}: retrieval needs the trained stage-3 label regressor or stage clip_image; run "
                          f"`neuroimagen train --out {run_dir} --stages semantic` (or clip_image) first")
    cfg = prepare_data(cfg, run_dir, log)
    splits = load_splits(cfg.data, image_mode="path" if "clip_image" in scored else "none")
    ds = splits[cfg.eval.split]
    rec = ds.recording
    labels, subj = ds.labels, ds.subjects
    if len(ds) == 0:
        raise DataError(f"{cfg.eval.split} split: no trials to retrieve")
    concepts = sorted(set(labels.tolist()))
    seen = set(splits["train"].labels.tolist())
    unseen = [c for c in concepts if c not in seen]
    wanted = sorted({int(s) for s in subj.tolist()}) if subjects is None else [int(s) for s in subjects]
    for s in wanted:
        if not bool((subj == s).any()):
            raise DataError(f"--subjects: subject {s} has no trials in the {cfg.eval.split} split")
    control_seed = cfg.seed + 53
    rows, per_embedding = [], {}
    for emb in scored:
        pred, gallery, target, proto = (_caption if emb == "caption" else _clip_image)(cfg, run_dir, record, ds, rec)
        for s in [*map(str, wanted), "all"]:
            keep = torch.ones(len(ds), dtype=torch.bool) if s == "all" else subj == int(s)
            p, t = pred[keep], target[keep]
            for control, q in (("eeg", p), ("shuffled", p[_shuffled(len(p), control_seed)])):
                if len(p) < 2 and control == "shuffled":
                    continue
                for r in retrieval_accuracy(cosine_similarity(q, gallery), t, DEFAULT_WAYS, DEFAULT_TOPS, DRAWS, cfg.seed):
                    rows.append({"protocol": "within" if cfg.data.holdout_subject is None else "loso",
                                 "embedding": emb, "subject": s, "control": control, **r})
        per_embedding[emb] = {**proto, "control": f"shuffled: the predictions permuted across the trials (a "
                                                  f"derangement, seed {control_seed})"}
    table = pd.DataFrame(rows)
    shared = {
        "split": cfg.eval.split, "n_trials": len(ds),
        "zero_shot": len(unseen) == len(concepts),
        "unseen_concepts": len(unseen),
        "note": ("zero-shot: no evaluated concept has a training trial" if len(unseen) == len(concepts) else
                 f"not zero-shot: {len(concepts) - len(unseen)} of {len(concepts)} evaluated concepts have training "
                 "trials (class retrieval)"),
        "ways": list(DEFAULT_WAYS), "tops": list(DEFAULT_TOPS), "draws": DRAWS, "seed": cfg.seed,
        "repetitions": ("THINGS-EEG2 test repetitions: " + str(getattr(cfg.data, "test_repetitions", "average"))
                        if cfg.data.format == "things-eeg" else "one trial per image presentation"),
    }
    first = per_embedding["caption" if "caption" in per_embedding else scored[0]]
    protocol = {**first, **shared, "embeddings": {e: {**p, **shared} for e, p in per_embedding.items()},
                "provenance": provenance()}
    res = run_dir / "results"
    with atomic_path(res / "retrieval.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    write_text(res / "retrieval.json", json.dumps(protocol, indent=1, default=str))
    for emb in scored:
        top = table[(table["embedding"] == emb) & (table["subject"] == "all") & (table["control"] == "eeg")
                    & (table["top"] == 1)]
        if len(top):
            best = top.iloc[-1]
            log(f"retrieval ({emb}): {int(best['k'])}-way top-1 {100 * best['accuracy']:.1f} % (chance "
                f"{100 * best['chance']:.1f} %) over {len(ds)} trials, {shared['note']} -> {res / 'retrieval.csv'}")
    return table


score_retrieval = semantic_retrieval  # the same function under the name that says it scores every embedding
