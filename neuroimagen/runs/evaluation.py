"""Reconstruct and score a trained run: the functions behind ``neuroimagen reconstruct`` and ``evaluate``.

``reconstruct`` prepares the two frozen components (the latent diffusion snapshot and the evaluation
classifier, trained and cached by content hash for the embedded default), lists every (subject, variant,
trial, sample) row of the evaluation split, and pushes the rows that are not finished yet through
Decode -> Generate -> Score (Ray Data actors, or the same callables in a loop). Rows are grouped in
*shards*, one per (subject, variant); a shard is written atomically to
``results/shards/<fingerprint>/`` as soon as its last row is scored, so an interrupted run loses at most
the unfinished shards, and a re-run skips the finished ones. The fingerprint covers every setting that
changes a number (models, LDM, classifier, metric protocol), so changed settings never reuse old shards.

``evaluate`` concatenates the shards into ``results/per_sample.parquet``, reduces them into
``results/summary.csv`` (IS, FID and KID once per group; a bootstrap interval for every number), runs the
paired permutation tests between variants into ``results/tests.csv`` and writes ``results/protocol.json``
(with one protocol card per number).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
import pandas as pd
import torch

from neuroimagen.atomic import atomic_path, make_dir, remove_partials, write_text
from neuroimagen.config import Config, to_dict
from neuroimagen.data.captions import label_caption
from neuroimagen.data.datasets import load_image, load_splits
from neuroimagen.errors import ConfigError, DataError
from neuroimagen.frozen.judge import judge_cache_key, train_judge
from neuroimagen.frozen.ldm import tiny_ldm_key, train_tiny_ldm
from neuroimagen.logs import Progress, get_logger
from neuroimagen.metrics.flags import FlagRules, flag_warning, variant_flags
from neuroimagen.metrics.inception_score import MIN_SPLIT_SIZE
from neuroimagen.metrics.nway import effective_n
from neuroimagen.metrics.summary import (
    ACC_COLUMNS,
    Statistics,
    compare_variants,
    per_image_metrics,
    summarize,
    uncovered_labels,
    withhold,
)
from neuroimagen.models import ldm
from neuroimagen.models.classifier import (
    is_network_record,
    label_to_class,
    load_classifier,
    read_class_index,
    save_classifier,
)
from neuroimagen.models.ldm import snapshot_resolution
from neuroimagen.provenance import provenance
from neuroimagen.reconstruction.factory import RunSources, check_text_encoder, load_reconstruct, stage_models
from neuroimagen.reconstruction.rows import (
    PURPOSES,
    SEEDING,
    build_rows,
    needed_stages,
    rows_to_batch,
    safe_name,
    select_variants,
)
from neuroimagen.runs.cards import metric_cards, suite_protocol, suite_record
from neuroimagen.runs.reports import write_report
from neuroimagen.runs.retrieval import semantic_retrieval
from neuroimagen.runs.training import FitStage, prepare_data, read_run, train
from neuroimagen.stages import STAGE_ORDER
from neuroimagen.stages.semantic import text_encoder_for
from neuroimagen.training.context import usable_cpus
from neuroimagen.training.loop import kill_once

STATE = "results/state.json"
# per-image columns holding one vector per image (stored as lists in the shards)
VECTOR_COLUMNS = ("probs", "is_probs", "fid_feats", "fid_gt")
# eval settings that do not change any number (execution only)
_EXECUTION_KEYS = ("backend", "actors", "pipeline", "batch_size", "use_gpu", "variants", "subjects", "fault_injection_batch",
                   "fault_injection_shard", "protocol")  # protocol: loso adds fold runs, this run's numbers are the same
# eval.suite settings read only by `evaluate` (the reduction of finished shards): changing them never recomputes a shard
SUMMARY_KEYS = ("kid_subsets", "kid_subset_size", "bootstrap", "bootstrap_whole_set", "ci_level", "permutations",
                "comparisons")


_log = get_logger(__name__)


class RunRows(Protocol):
    """Push ``rows`` through decode -> generate -> score built from ``sources``
    (``neuroimagen.reconstruction.factory.RunSources``) and hand each scored batch to ``on_batch`` on this process."""

    def __call__(self, rows: list[dict], cfg: Config, sources: RunSources, on_batch: Callable[[dict], None],
                 progress: bool = True) -> None: ...


def _unique_images(ds) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, stems) of a split's distinct images, in dataset order (nothing decoded)."""
    rec = ds.recording
    seen: set[str] = set()
    paths, labels, stems = [], [], []
    for j in ds.indices:
        p = rec.image_paths[int(j)]
        if p is None or p in seen:
            continue
        seen.add(p)
        paths.append(p)
        labels.append(int(rec.labels[int(j)]))
        stems.append(rec.stems[int(j)])
    return paths, labels, stems


def _decode(paths: list[str], size: int):
    """Images (N, 3, size, size) in [0, 1]; only called when a cached model has to be (re)trained."""
    return torch.stack([load_image(p, size) for p in paths]) if paths else torch.empty(0, 3, size, size)


def prepare_ldm(cfg: Config, run_dir: Path, splits: dict, log: Optional[Callable[[str], None]] = None) -> tuple[str, dict]:
    """(snapshot directory, description). Pretrained: resolved offline. Tiny: trained once, cached by hash."""
    log = log or _log.info
    lc = cfg.ldm
    if lc.pretrained is not None:
        root = ldm.resolve_snapshot(lc.pretrained)
        return str(root), {"kind": "pretrained", "identity": str(root)}
    train = splits["train"]
    paths, _, stems = _unique_images(train)
    rec = train.recording
    names = rec.class_names
    label_by_stem = {rec.stems[int(j)]: int(rec.labels[int(j)]) for j in train.indices}
    captions = [[label_caption(names[label_by_stem[s]]) for s in stems]]
    if rec.captions is not None and all(s in rec.captions for s in stems):
        captions.append([rec.captions[s] for s in stems])
    te = text_encoder_for(cfg, run_dir)
    key = tiny_ldm_key(te.identity, stems, captions, lc)
    out = run_dir / "ldm" / f"tiny-{key}"
    desc = {"kind": "tiny", "identity": f"tiny-ldm-{key}", "path": str(out), "trained_on": f"{len(stems)} training images",
            "captions": ["label"] + (["image"] if len(captions) > 1 else []), "resolution": lc.resolution}
    if (out / "model_index.json").is_file() and (out / "neuroimagen.json").is_file():
        log(f"tiny LDM: reusing {out}")
        desc.update(json.loads((out / "neuroimagen.json").read_text(encoding="utf-8")))
        return str(out), desc
    log(f"tiny LDM: training a VAE ({lc.vae_steps} steps) and a conditional UNet ({lc.unet_steps} steps) on "
        f"{len(stems)} training images at {lc.resolution} px")
    t0 = time.perf_counter()
    embeds = [te.encode(c) for c in captions]
    res = train_tiny_ldm(_decode(paths, lc.resolution), embeds, te.encode([""])[0], lc, progress=cfg.train.progress, log=log)
    hist = res["history"]
    tail = hist["unet"][-max(1, len(hist["unet"]) // 10):]
    extra = {"key": key, "vae_recon_mse": hist["vae_recon_mse"], "unet_eps_mse_final": sum(tail) / len(tail),
             "seconds": round(time.perf_counter() - t0, 1), "text_encoder": te.identity}
    ldm.save_snapshot(out, res["vae"], res["unet"], te, extra=extra)
    desc.update(extra)
    log(f"tiny LDM: saved to {out} ({extra['seconds']} s)")
    return str(out), desc


def _label_space(cfg: Config, recording) -> tuple[Optional[list[str]], dict]:
    """(the classifier's WNIDs or None, the label-space part of its description) for a torchvision classifier.

    With ``eval.classifier_classes`` the dataset's WNIDs (``recording.class_ids``) are looked up in the file
    (``label_to_class``); without it the classifier's indices cannot be compared with the dataset's labels and
    the GT accuracy is not available (the reason is recorded)."""
    ec = cfg.eval
    if ec.classifier_classes is None:
        reason = (f"not available: eval.classifier_classes is not set, so the {ec.classifier} classifier's class "
                  f"indices cannot be compared with the dataset's {len(recording.class_ids)} labels (set it to an "
                  f"imagenet_class_index.json or a WNID-per-line file)")
        return None, {"label_to_class": None, "label_space": "the classifier's own (no class-index file)",
                      "gt_accuracy_unavailable": reason}
    try:
        ids = read_class_index(ec.classifier_classes)
        lut = label_to_class(recording.class_ids, ids, ec.classifier_classes, missing=-1)
    except ConfigError as exc:
        raise ConfigError(f"eval.classifier_classes: {exc}") from None
    # a dataset class the file lacks (a THINGS concept, a WNID outside ImageNet-1k) cannot be judged: evaluate
    # withholds ACC when the evaluated split has one
    absent = [w for w, c in zip(recording.class_ids, lut) if c < 0]
    coverage = (f"the dataset classes whose id is in {ec.classifier_classes}: {len(lut) - len(absent)} of {len(lut)}"
                + (f" (not there: '{absent[0]}'" + (f" and {len(absent) - 1} more" if len(absent) > 1 else "") + ")"
                   if absent else ""))
    return ids, {"label_to_class": lut, "label_space": f"dataset WNIDs looked up in {ec.classifier_classes} "
                                                       f"({len(ids)} classes)",
                 "covered_labels": [i for i, c in enumerate(lut) if c >= 0], "coverage": coverage}


def prepare_classifier(cfg: Config, run_dir: Path, splits: dict, resolution: int,
                       log: Optional[Callable[[str], None]] = None) -> tuple[dict, dict]:
    """(classifier spec for Score, description). Judge: trained on the training images, cached by hash.

    The description carries ``label_to_class`` (the dataset label -> the classifier's class index, or None when
    the label spaces cannot be compared) and ``label_space`` (how it was made): identity for the judge (trained
    on the dataset's labels); the class-index file ``eval.classifier_classes`` for a torchvision classifier."""
    log = log or _log.info
    ec = cfg.eval
    if ec.classifier is not None:
        if not Path(ec.classifier_weights).is_file():
            raise ConfigError(f"eval.classifier_weights: {ec.classifier_weights}: file not found")
        ids, space = _label_space(cfg, splits["train"].recording)
        spec = {"kind": "torchvision", "arch": ec.classifier, "weights": ec.classifier_weights,
                "image_size": ec.classifier_image_size, "class_names": ids, "classes_file": ec.classifier_classes}
        return spec, {"kind": "torchvision", "identity": f"torchvision:{ec.classifier}@{ec.classifier_weights}",
                      "arch": ec.classifier, **space}
    paths, labels, stems = _unique_images(splits["train"])
    judge_space = {"label_to_class": list(range(splits["train"].num_classes)),
                   "label_space": "the dataset's labels (the judge is trained on them)",
                   "covered_labels": sorted(set(int(v) for v in labels)),
                   "coverage": f"the labels with training images ({len(set(labels))} of {splits['train'].num_classes}): "
                               "the judge learns no other class"}
    key = judge_cache_key(json.dumps(stems), resolution=resolution, steps=ec.judge_steps, width=ec.judge_width,
                          seed=cfg.seed, labels=labels)
    out = run_dir / "judge" / f"judge-{key}"
    spec = {"kind": "judge", "path": str(out)}
    if (out / "classifier.json").is_file():
        log(f"judge classifier: reusing {out}")
        return spec, {**load_classifier(out).describe(), **judge_space}
    log(f"judge classifier: training a small CNN on {len(stems)} training images at {resolution} px "
        f"({ec.judge_steps} steps)")
    val_paths, val_labels, _ = _unique_images(splits["val"])
    clf = train_judge(_decode(paths, resolution), torch.tensor(labels, dtype=torch.long), splits["train"].num_classes,
                      val_images=_decode(val_paths, resolution), val_labels=torch.tensor(val_labels, dtype=torch.long),
                      input_size=resolution, width=ec.judge_width, steps=ec.judge_steps, seed=cfg.seed,
                      class_names=list(splits["train"].class_names), progress=cfg.train.progress)
    save_classifier(clf, out)
    d = clf.describe()
    log(f"judge classifier: train accuracy {d.get('train_accuracy', float('nan')):.3f}, validation accuracy "
        f"{d.get('val_accuracy', float('nan')):.3f} -> {out}")
    return spec, {**d, **judge_space}


def prepare_is_network(cfg: Config) -> tuple[dict, dict]:
    """(IS network spec for Score, description); both empty with ``eval.is_network: classifier`` (the IS then
    uses the ACC classifier's probabilities). The weights file is hashed here, once, for the label and the
    fingerprint; its preprocessing is read from torchvision's ``Inception_V3_Weights.IMAGENET1K_V1``."""
    ec = cfg.eval
    if ec.is_network == "classifier":
        return {}, {}
    path = Path(ec.is_weights)
    if not path.is_file():
        raise ConfigError(f"eval.is_weights: {ec.is_weights}: file not found (expected a local torchvision "
                          f"Inception-v3 state dict; nothing is downloaded)")
    desc = is_network_record(path)
    return {"kind": "inception", "weights": desc["weights"], "sha256": desc["weights_sha256"]}, desc


def is_labels(clf: dict, is_net: dict) -> dict[str, dict]:
    """summary.csv IS column -> {'label', 'network'}: every IS names the network that produced it."""
    kind, ident = clf.get("kind"), clf.get("identity", "?")
    if kind == "judge":
        out = {"is": {"label": "IS (judge CNN, not Inception-v3)",
                      "network": f"the judge CNN {ident} trained on the training images; not Inception-v3, so not "
                                 f"comparable with published IS (only within this report)"}}
    else:
        arch = clf.get("arch") or str(ident).split("@")[0].split(":")[-1]
        note = "" if arch == "inception_v3" else ", not Inception-v3"
        out = {"is": {"label": f"IS ({arch} ACC classifier{note})",
                      "network": f"the ACC classifier {ident}{note}; its own preprocessing"}}
    if is_net:
        layout = "torchvision's own IMAGENET1K_V1 file" if is_net.get("torchvision_file") else \
            "torchvision IMAGENET1K_V1 layout, not torchvision's own file"
        out["is_inception_v3"] = {"label": "IS (Inception-v3)",
                                  "network": f"Inception-v3 ({layout}), weights sha256 {is_net.get('weights_sha256')}, "
                                             f"{is_net.get('input_size')} px: {is_net.get('preprocessing')}"}
    return out


def fingerprint(cfg: Config, record: dict, ldm_identity: str, classifier_identity: str, stages: Sequence[str]) -> str:
    """Hash of everything that changes a number; paths of the run itself are left out, so a copied or
    moved run directory keeps its finished shards. ``seeding`` names how the per-row seeds are derived from the
    seed (``rows.SEEDING``): shards drawn with another derivation are never reused."""
    ev = {k: v for k, v in to_dict(cfg.eval).items() if k not in _EXECUTION_KEYS}
    ev["suite"] = {k: v for k, v in ev["suite"].items() if k not in SUMMARY_KEYS}
    doc = {"seed": cfg.seed, "seeding": SEEDING, "ldm": to_dict(cfg.ldm), "eval": ev, "snapshot": ldm_identity,
           "classifier": classifier_identity, "stages": {s: record["stages"][s].get("finished") for s in stages},
           "data": {k: v for k, v in to_dict(cfg.data).items() if not (k == "holdout_subject" and v is None)}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:12]


def galleries(rows: Sequence[dict]) -> dict[str, list[str]]:
    """subject -> the distinct ground-truth image paths of its rows, in row order: the gallery of the suite's
    two-way identification and chance baselines (the same for every variant of the subject)."""
    out: dict[str, dict[str, None]] = {}
    for r in rows:
        if r["gt"]:
            out.setdefault(str(r["subject"]), {})[str(r["gt"])] = None
    return {s: list(paths) for s, paths in out.items()}


def _shard_name(subject: str, variant: str) -> str:
    return f"s{subject}__{safe_name(variant)}.parquet"


def _read_shard(path: Path, expected: int):
    """A finished shard's rows, or None when missing / unreadable / incomplete (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        df = pd.read_parquet(path)
    except Exception:  # noqa: BLE001 - a damaged file is never trusted
        return None
    return df if len(df) == expected and not df.duplicated(["item", "sample"]).any() else None


def _die_mid_write(tmp: Path, marker: Path) -> None:
    """Testing hook (``eval.fault_injection_shard``): leave ``tmp`` half-written and SIGKILL this process, once."""
    if marker.exists():
        return
    data = tmp.read_bytes()
    tmp.write_bytes(data[: len(data) // 2])
    kill_once(marker)


def reconstruct(cfg: Config, run_dir: str | Path, variants: Optional[Sequence[str]] = None,
                subjects: Optional[Sequence[int]] = None, log: Optional[Callable[[str], None]] = None,
                execute: Optional[RunRows] = None) -> dict:
    """Generate and score every missing shard; returns {'rows', 'computed', 'reused', 'seconds', 'state'}.

    ``execute`` runs the rows (``RunRows``; default ``run_local``, which needs ``eval.backend: local``; Ray Data is
    ``neuroimagen.distributed.data.run_on_ray``, and ``neuroimagen.backends.run_rows`` picks by ``eval.backend``)."""
    log = log or _log.info
    if execute is None:
        if cfg.eval.backend != "local":
            raise ConfigError(f"eval.backend: '{cfg.eval.backend}' needs its runner passed in "
                              "(neuroimagen.backends.run_rows); this call only has the in-process one")
        execute = run_local
    run_dir = Path(run_dir).resolve()
    t0 = time.perf_counter()
    names = select_variants(cfg, variants)
    record = read_run(run_dir)
    if not variants:  # the default list: compute what this run can, and say what it skips
        names = computable_variants(cfg, names, set(record["stages"]), log, "reconstruct")
    stages = needed_stages(cfg, names)
    missing = [s for s in stages if s not in record["stages"]]
    if missing:
        lacking = [v for v in names if set(needed_stages(cfg, [v])) - set(record["stages"])]
        raise ConfigError(f"{run_dir}: variant(s) {', '.join(lacking)} need trained stage(s) {', '.join(missing)}; run "
                          f"`neuroimagen train --out {run_dir} --stages {','.join(missing)}` first")
    splits = load_splits(cfg.data, image_mode="path")
    snapshot, ldm_desc = prepare_ldm(cfg, run_dir, splits, log)
    # stage 3 and the prompts must live in the diffusion model's own text-encoder space: checked before generating
    check_text_encoder(stage_models(run_dir, record, stages), snapshot, configured=cfg.text_encoder.pretrained)
    resolution = snapshot_resolution(snapshot) if cfg.ldm.pretrained else cfg.ldm.resolution
    # the judge sees images resized to at most 64 px (its input size), whatever the LDM's resolution
    clf_spec, clf_desc = prepare_classifier(cfg, run_dir, splits, min(resolution, 64), log)
    is_spec, is_desc = prepare_is_network(cfg)
    suite = suite_record(cfg, clf_desc)
    clf_identity = clf_desc["identity"] + (f" + IS {is_desc['identity']}" if is_desc else "") + " + suite " + \
        json.dumps({k: v.get("sha256") or v.get("identity") for k, v in suite["networks"].items()}, sort_keys=True)
    fp = fingerprint(cfg, record, ldm_desc["identity"], clf_identity, stages)
    rows = build_rows(cfg, splits["train"].recording, names, subjects)
    shard_dir = run_dir / "results" / "shards" / fp
    stale = remove_partials(run_dir / "results")  # temporary files of an interrupted run: never read, never kept
    if stale:
        log(f"reconstruct: removed {stale} partial file(s) left by an interrupted run")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(_shard_name(r["subject"], r["variant"]), []).append(r)
    todo = [r for name, rs in groups.items() if _read_shard(shard_dir / name, len(rs)) is None for r in rs]
    reused = len(groups) - len({_shard_name(r["subject"], r["variant"]) for r in todo})
    state = {"fingerprint": fp, "variants": names, "subjects": sorted({r["subject"] for r in rows}, key=lambda s: (len(s), s)),
             "shards": {n: len(rs) for n, rs in groups.items()}, "ldm": {**ldm_desc, **to_dict(cfg.ldm)},
             "classifier": {**clf_desc, "spec": clf_spec}, "is_network": {**is_desc, "spec": is_spec} if is_spec else {},
             "eval": to_dict(cfg.eval), "seed": cfg.seed, "seeding": SEEDING,
             "data": {"format": cfg.data.format, "eeg": cfg.data.eeg, "split": cfg.eval.split,
                      "split_file": cfg.data.splits, "split_num": cfg.data.split_num},
             "variant_definitions": {n: dataclasses.asdict(cfg.eval.variant(n)) for n in names},
             "resolution": resolution, "suite": suite, "provenance": provenance()}
    write_text(run_dir / STATE, json.dumps(state, indent=1, default=str))
    log(f"reconstruct: {len(rows)} images in {len(groups)} shards ({len(names)} variants x "
        f"{len(state['subjects'])} subjects x {cfg.ldm.samples_per_eeg} samples); {reused} shards already done, "
        f"{len(todo)} images to generate ({cfg.eval.backend} backend)")
    pending = {n: {} for n in groups}
    done = {"shards": 0}
    finished: set[str] = set()

    def on_batch(batch: dict) -> None:
        cols = list(batch)
        n = len(batch["item"])
        for i in range(n):
            row = {c: (batch[c][i].tolist() if c in VECTOR_COLUMNS else batch[c][i]) for c in cols}
            row["subject"], row["variant"] = str(row["subject"]), str(row["variant"])
            name = _shard_name(row["subject"], row["variant"])
            if name in finished:  # a row delivered again (a retried task) after its shard was written
                continue
            pending[name][(int(row["item"]), int(row["sample"]))] = row  # a retried batch overwrites, never duplicates
            if len(pending[name]) == len(groups[name]):
                df = pd.DataFrame(sorted(pending[name].values(), key=lambda r: (int(r["item"]), int(r["sample"]))))
                with atomic_path(shard_dir / name) as tmp:
                    df.to_parquet(tmp, index=False)
                    if cfg.eval.fault_injection_shard == done["shards"]:
                        _die_mid_write(tmp, run_dir / "results" / "fault-injected-shard")
                pending[name] = {}
                finished.add(name)
                done["shards"] += 1
                log(f"reconstruct: shard {name[:-8]} done ({done['shards']}/{len(groups) - reused})")

    if todo:
        sources = RunSources(run_dir=str(run_dir), snapshot=snapshot, classifier=clf_spec, is_network=is_spec,
                             gallery=galleries(rows),
                             models=stage_models(run_dir, record, stages), device="cuda" if cfg.eval.use_gpu else "cpu")
        execute(todo, cfg, sources, on_batch, progress=cfg.train.progress)
    left = [n for n, p in pending.items() if p]
    if left:
        raise DataError(f"reconstruct: shard(s) {', '.join(left)} incomplete after the run (rows were lost)")
    secs = round(time.perf_counter() - t0, 1)
    log(f"reconstruct: {len(todo)} images generated and scored in {secs} s")
    return {"rows": len(rows), "computed": len(todo), "reused": reused, "seconds": secs, "state": state}


def computable_variants(cfg: Config, names: Sequence[str], available: set[str], log: Callable[[str], None],
                        who: str) -> list[str]:
    """``names`` without the variants that need a stage not in ``available``, with one line saying which were
    skipped and why; a ConfigError when none is left. For the default variant list only: a variant asked for
    by name that cannot be computed stays an error."""
    keep, skipped, why = [], [], set()
    for v in names:
        lacking = [s for s in needed_stages(cfg, [v]) if s not in available]
        (skipped if lacking else keep).append(v)
        why.update(lacking)
    if skipped:
        reason = " (data.captions is not set)" if "semantic_image" in why and cfg.data.captions is None else ""
        stages = ", ".join(s for s in STAGE_ORDER if s in why)
        if not keep:
            raise ConfigError(f"{who}: every variant ({', '.join(names)}) needs stage(s) {stages}, not trained{reason}")
        log(f"{who}: skipping variant(s) {', '.join(skipped)}: they need stage(s) {stages}, not trained{reason}; "
            f"computing {', '.join(keep)}")
    return keep


def run_local(rows: list[dict], cfg: Config, sources: RunSources, on_batch: Callable[[dict], None],
              progress: bool = True) -> None:
    """``RunRows`` in this process (``eval.backend: local``): the Ray Data pipeline's callables in a plain loop over
    batches of ``eval.batch_size`` (same outputs), with every core unless ``sources.threads`` says otherwise."""
    sources = sources if sources.threads else dataclasses.replace(sources, threads=usable_cpus())
    batch_size = cfg.eval.batch_size
    pipeline = load_reconstruct(cfg, sources)
    with Progress(total=len(rows), desc="reconstruct", unit="images", logger=_log, enabled=progress) as bar:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i: i + batch_size]
            on_batch(pipeline(rows_to_batch(chunk)))
            bar.update(len(chunk))


def _dataset_name(data: dict) -> str:
    eeg = Path(str(data.get("eeg") or ""))
    twin = " (synthetic twin)" if eeg.parent.name == "twin" or "twin" in eeg.parts[-3:-1] else ""
    if data.get("format") == "things-eeg":  # a folder of sub-XX/ (the twin's is itself); the files fix the split
        twin = " (synthetic twin)" if "twin" in eeg.parts[-2:] else ""
        return f"things-eeg `{eeg.name}`{twin}, test concepts disjoint from the training ones (zero-shot)"
    return f"{data.get('format')} `{eeg.name}`{twin}, split file `{Path(str(data.get('split_file') or '')).name}` #{data.get('split_num')}"


def acc_unavailable(clf: dict, labels: Sequence[int], split: str) -> Optional[str]:
    """Why N-way ACC cannot be reported, or None: the classifier has no class for some of the evaluated trials'
    labels (``clf['covered_labels']``, recorded by :func:`prepare_classifier`; a run that did not record it is
    taken as covered). ACC's true class is the classifier's top-1 on the ground-truth image, so on a concept the
    classifier never learned (THINGS-EEG2's zero-shot test concepts against the judge) it measures nothing."""
    missing = uncovered_labels(labels, clf.get("covered_labels"))
    if not missing:
        return None
    n = len(set(int(v) for v in labels))
    shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
    if clf.get("kind") == "judge":
        why = (f"the judge is trained on the training images only, and {len(missing)} of the {n} {split} concepts "
               f"have none (labels {shown}: zero-shot concepts, as THINGS-EEG2's test set), so its classes do not "
               "cover them; N-way ACC, ACC max-of-samples, the judge's GT accuracy and its IS would measure nothing")
    else:
        why = (f"{len(missing)} of the {n} {split} classes (labels {shown}) have no class in the classifier's class "
               f"index ({clf.get('coverage', 'eval.classifier_classes')}); N-way ACC, ACC max-of-samples and the GT "
               "accuracy would measure nothing")
    return (f"not available: {why}. The judge-free metrics (PixCorr, SSIM, two-way identification, FID/KID) "
            "stand; for ACC, use a classifier whose classes cover the evaluated concepts")


def evaluate(run_dir: str | Path, log: Optional[Callable[[str], None]] = None):
    """Shards -> ``per_sample.parquet``, ``summary.csv``, ``protocol.json``; returns the summary DataFrame."""
    log = log or _log.info
    run_dir = Path(run_dir).resolve()
    sp = run_dir / STATE
    if not sp.is_file():
        raise DataError(f"{sp}: not found; run `neuroimagen reconstruct --run {run_dir}` first")
    state = json.loads(sp.read_text(encoding="utf-8"))
    remove_partials(run_dir / "results")
    shard_dir = run_dir / "results" / "shards" / state["fingerprint"]
    frames = []
    for name, n in state["shards"].items():
        df = _read_shard(shard_dir / name, n)
        if df is None:
            raise DataError(f"{shard_dir / name}: missing or incomplete; re-run `neuroimagen reconstruct --run {run_dir}` "
                            f"(finished shards are reused)")
        frames.append(df)
    per_sample = pd.concat(frames, ignore_index=True)
    ev = state["eval"]
    num_classes = len(per_sample["probs"].iloc[0])
    clf = state["classifier"]
    is_net = {k: v for k, v in (state.get("is_network") or {}).items() if k != "spec"}
    # the dataset label in the classifier's label space (a run scored before it was recorded: identity for a judge)
    lut = clf.get("label_to_class", list(range(num_classes)) if clf.get("kind") == "judge" else None)
    unavailable = None if lut is not None else clf.get("gt_accuracy_unavailable", (
        "not available: the classifier's class indices were not mapped to the dataset's labels"))
    st = (state.get("suite") or {}).get("statistics") or {}
    stats = Statistics(**{k: v for k, v in st.items() if k in Statistics.__dataclass_fields__}, seed=state["seed"])
    summary = summarize(per_sample, k=ev["top_k"], is_splits=ev["is_splits"], is_seed=state["seed"],
                        label_to_class=lut, stats=stats)
    rules = FlagRules(n_perm=stats.n_perm, seed=state["seed"], top_k=ev["top_k"])
    flags = variant_flags(per_sample, rules)
    summary = summary.merge(flags[["subject", "variant", "flags"]], on=["subject", "variant"], how="left")
    summary["flags"] = summary["flags"].fillna("")
    pooled_gt = per_sample.drop_duplicates(["subject", "item"])
    no_acc = acc_unavailable(clf, pooled_gt["label"].to_numpy(), state["data"].get("split", "evaluated"))
    withheld = (*ACC_COLUMNS, *(("is",) if clf.get("kind") == "judge" else ())) if no_acc else ()
    if no_acc:
        summary = withhold(summary, withheld)
        unavailable = no_acc
    pairs = [tuple(c.split(":", 1)) for c in st.get("comparisons", ())]
    tests = compare_variants(per_sample, pairs, stats,
                             metrics=[m for m in per_image_metrics(per_sample) if not (no_acc and m == "acc_hit")])
    n_eff, warning = effective_n(ev["n_way"], num_classes)
    gt_acc = None
    if lut is not None and not no_acc:
        gt_acc = float((pooled_gt["judge_gt_top1"].to_numpy() == np.asarray(lut)[pooled_gt["label"].to_numpy()]).mean())
    default_space = "the dataset's labels (the judge is trained on them)" if clf.get("kind") == "judge" else "not recorded"
    labels = is_labels(clf, is_net)
    labels = {c: v for c, v in labels.items() if c in summary.columns}
    protocol = {
        "data": {"dataset": _dataset_name(state["data"]), **state["data"], "subjects": state["subjects"],
                 "n_trials": int(len(pooled_gt))},
        "classifier": {**{k: v for k, v in clf.items() if k not in ("spec", "gt_accuracy_unavailable", "covered_labels")},
                       "num_classes": num_classes, "gt_accuracy": gt_acc,
                       **({"gt_accuracy_unavailable": unavailable} if unavailable else {}),
                       "gt_accuracy_protocol": f"top-1 on the {state['data']['split']} split's ground-truth images at "
                                               f"{state['resolution']} px against the dataset label in the classifier's "
                                               f"label space ({clf.get('label_space', default_space)})"},
        "acc": {"n": ev["n_way"], "k": ev["top_k"], "trials": ev["trials"], "n_eff": n_eff, "warning": warning,
                "seed": (f"per image: seed_nway = SeedSequence(entropy={state['seed']}, spawn_key=({PURPOSES['nway']}, "
                         "trial, sample)), the same for every variant, a stream apart from the saliency z and the "
                         "diffusion noise"),
                "true_class": "the classifier's top-1 on the ground-truth image (MinD-Vis protocol)",
                **({"unavailable": no_acc, "withheld": list(withheld)} if no_acc else {})},
        "is": {"networks": labels, **({"is_network": is_net} if is_net else {}),
               "max_splits": ev["is_splits"], "min_split_size": MIN_SPLIT_SIZE,
               "split_rule": f"splits = clamp(N // {MIN_SPLIT_SIZE}, 1, {ev['is_splits']}) for a group of N images",
               "permutation": f"rows sorted by (subject, trial, sample), then shuffled by torch.randperm(N) with "
                              f"torch.Generator().manual_seed({state['seed']}) before splitting",
               "seed": state["seed"],
               "groups_definition": "all generations of one (subject, variant), and of one variant over all subjects "
                                    "(subject 'all')",
               "groups": [{"subject": r["subject"], "variant": r["variant"], "n": int(r["is_n"]),
                           "splits": int(r["is_splits"])} for r in summary.to_dict("records")],
               "classifier_note": labels["is"]["network"],
               **({"unavailable": no_acc} if "is" in withheld else {})},
        "ssim": {"convention": ev["ssim_convention"],
                 "resolution": ev["ssim_resolution"] or (425 if ev["ssim_convention"] == "mindeye" else state["resolution"]),
                 **({"preprocessing": "MindEye: clamp to [0, 1], resize both to 256 x 256, then to the resolution "
                                      "(bilinear, no antialiasing), grey (rgb2gray), Gaussian-window SSIM"}
                    if ev["ssim_convention"] == "mindeye" else {})},
        "ldm": {"kind": state["ldm"]["kind"], "identity": state["ldm"]["identity"], "strength": state["ldm"]["strength"],
                "guidance_scale": state["ldm"]["guidance_scale"], "num_inference_steps": state["ldm"]["num_inference_steps"],
                "samples_per_eeg": state["ldm"]["samples_per_eeg"], "resolution": state["resolution"],
                "scheduler": "DDIM (eta 0), SD 1.x noise schedule",
                "seed": (f"diffusion noise per image: seed_noise = SeedSequence(entropy={state['seed']}, spawn_key="
                         f"({PURPOSES['noise']}, trial, sample)); saliency z per EEG trial: seed_z = SeedSequence("
                         f"entropy={state['seed']}, spawn_key=({PURPOSES['z']}, trial)), one saliency map for all "
                         "samples and variants of a trial")},
        "suite": suite_protocol(state),
        "seeding": state.get("seeding", "not recorded"),
        "variants": state["variant_definitions"],
        "flags": {"rule": rules.describe(), "thresholds": rules.as_dict(),
                  "column": "summary.csv `flags`: the flags that fired, '; '-joined, empty when none",
                  "flagged": [f"{r.variant} ({'pooled' if r.subject == 'all' else 'subject ' + r.subject}): {r.flags}"
                              for r in flags.itertuples() if r.flags],
                  "groups": [{"subject": r.subject, "variant": r.variant, "flags": r.flags, **r.evidence}
                             for r in flags.itertuples()]},
        "provenance": {"reconstruct": state.get("provenance"), "evaluate": provenance()},
    }
    protocol["cards"] = metric_cards(protocol, state, [c for c in summary.columns if c not in ("subject", "variant")])
    for col, card in protocol["cards"].items():
        if col in withheld or (col.endswith(("_std", "_lo", "_hi")) and col.rsplit("_", 1)[0] in withheld):
            card["unavailable"] = no_acc
    res = run_dir / "results"
    with atomic_path(res / "tests.csv") as tmp:
        tests.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(res / "per_sample.parquet") as tmp:
        per_sample.to_parquet(tmp, index=False)
    with atomic_path(res / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False, float_format="%.6g")
    write_text(res / "protocol.json", json.dumps(protocol, indent=1, default=str))
    if warning:
        log(f"evaluate: {warning}")
    if no_acc:
        log(f"evaluate: warning: ACC withheld ({', '.join(withheld)} are n/a): {no_acc}")
    flagged = flag_warning(flags)
    if flagged:
        _log.warning(flagged)  # whatever `log` the caller passed: a user must see this one
    log(f"evaluate: {len(per_sample)} images -> {res / 'summary.csv'}")
    return summary


def stages_to_train(cfg: Config, variants: Sequence[str], done) -> list[str]:
    """The stages an ablation (and every leave-one-subject-out fold) trains: those the variants need and, when
    ``stages.clip_image.enabled``, ``clip_image`` (scored by the retrieval, not by a variant); minus ``done``."""
    need = needed_stages(cfg, variants) + (["clip_image"] if cfg.stages.clip_image.enabled else [])
    return [s for s in need if s not in done]


def ablation(cfg: Config, out: str | Path, variants: Optional[Sequence[str]] = None,
             subjects: Optional[Sequence[int]] = None, log: Optional[Callable[[str], None]] = None,
             fit: Optional[FitStage] = None, execute: Optional[RunRows] = None) -> Path:
    """Train the stages the variants need (those not finished in ``out``), reconstruct, evaluate, report.

    ``fit`` / ``execute``: how a stage is fitted and how rows are generated and scored (default: in-process;
    ``neuroimagen.backends.fit_stage`` / ``run_rows`` choose by ``train.backend`` / ``eval.backend``).

    The function behind ``neuroimagen ablation`` and ``jobs/ablation.py``; every step resumes.
    """
    log = log or _log.info
    run_dir = make_dir(Path(out).resolve())
    names = select_variants(cfg, variants)
    done = read_run(run_dir)["stages"]
    if not variants:  # the default list: leave out what this data cannot train (B, B+I without per-image captions)
        data_cfg = prepare_data(cfg, run_dir, log)
        trainable = {s for s in STAGE_ORDER if not (s == "semantic_image" and data_cfg.data.captions is None)}
        names = computable_variants(data_cfg, names, trainable | set(done), log, "ablation")
    todo = stages_to_train(cfg, names, done)
    if todo:
        log(f"ablation: training {', '.join(todo)} (needed by {', '.join(names)})")
        train(cfg, run_dir, todo, log=log, fit=fit)
    else:
        log(f"ablation: reusing the trained stages in {run_dir}")
    cfg = prepare_data(cfg, run_dir, log)
    reconstruct(cfg, run_dir, names, subjects, log=log, execute=execute)
    evaluate(run_dir, log=log)
    if {"semantic", "clip_image"} & set(read_run(run_dir)["stages"]):  # retrieval from the trained EEG embeddings
        semantic_retrieval(cfg, run_dir, subjects, log=log)
    path = write_report(run_dir)
    log(f"ablation: report -> {path}")
    return path
