"""Leave-one-subject-out (``eval.protocol: loso``): the cross-subject protocol, for both dataset layouts.

``run_loso`` first runs the within-subject ablation in ``RUN`` (every subject in every split), then one *fold*
per evaluated subject ``s``: a full run directory ``RUN/loso/sub-XX/`` whose config sets
``data.holdout_subject: s``, so every stage is trained and selected on the other subjects' train / val trials
(validation never comes from ``s``) and the reconstruction is scored on ``s``'s test trials, the same ones the
within-subject run scored (:func:`neuroimagen.data.datasets.hold_out_subject`). Each fold trains, reconstructs,
evaluates, scores the retrieval and writes its own report, exactly as ``neuroimagen ablation``.

A finished fold (``RUN/loso/sub-XX/loso.json``) is not redone; an interrupted one resumes like any run (finished
stages and shards are reused). The folds share the run's content-addressed caches of the tiny LDM, the judge
and the tiny text encoder (``ldm/``, ``judge/``, ``text_encoder/`` are links to the run's): they are trained on
training images, which every subject saw, and a cache entry is keyed by exactly what it was trained on.

Then, in ``RUN/results/``:

* ``summary_loso.csv``: one row per (protocol, subject, variant) for ``within`` (``RUN/results/summary.csv``) and
  ``loso`` (each fold's held-out subject), plus pooled rows (subject ``all``): the within run's pooled row, and
  the folds' per-image tables concatenated and reduced once by the same
  :func:`~neuroimagen.metrics.summary.summarize` as ``evaluate`` (means with the seeded trial-bootstrap interval
  ``<col>_lo`` / ``<col>_hi``; N-way ACC withheld when the classifier does not cover the evaluated concepts);
* ``retrieval_loso.csv``: the retrieval rows of ``results/retrieval.csv`` (``protocol`` within) and of every fold
  (``protocol`` loso), per embedding (``caption``; ``clip_image`` when ``stages.clip_image.enabled``: every fold
  trains that stage too), the pooled LOSO row being the mean over all held-out trials (folds weighted by trials);
* ``loso.json``: the protocol (folds, what each trained on, their LDM and classifier identities).

The report (``RUN/report/report.md``) then shows the per-subject table of both protocols side by side.
"""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import pandas as pd

from neuroimagen.atomic import atomic_path, make_dir, write_text
from neuroimagen.config import Config
from neuroimagen.data.datasets import load_recording, subjects_of
from neuroimagen.errors import ConfigError, DataError
from neuroimagen.logs import get_logger
from neuroimagen.metrics.summary import ACC_COLUMNS, Statistics, summarize, withhold
from neuroimagen.provenance import provenance
from neuroimagen.rundir import mark
from neuroimagen.runs.evaluation import STATE, RunRows, ablation, acc_unavailable
from neuroimagen.runs.reports import with_embedding, write_report
from neuroimagen.runs.training import FitStage, prepare_data

FOLDS = "loso"
DONE = "loso.json"
SUMMARY = Path("results") / "summary_loso.csv"
RETRIEVAL = Path("results") / "retrieval_loso.csv"
PROTOCOL = Path("results") / "loso.json"
SHARED_CACHES = ("ldm", "judge", "text_encoder")
_log = get_logger(__name__)


def fold_dir(run_dir: str | Path, subject: int) -> Path:
    """``RUN/loso/sub-XX``: the fold that holds ``subject`` out."""
    return Path(run_dir) / FOLDS / f"sub-{int(subject):02d}"


def fold_config(cfg: Config, subject: int) -> Config:
    """``cfg`` for the fold of ``subject``: ``data.holdout_subject`` set, every held-out trial evaluated."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, holdout_subject=int(subject)),
                               eval=dataclasses.replace(cfg.eval, subjects=None))


def _share_caches(run_dir: Path, fold: Path) -> None:
    """Link the fold's cache folders to the run's existing ones (relative links: a moved run keeps them)."""
    for name in SHARED_CACHES:
        target, link = run_dir / name, fold / name
        if target.is_dir() and not link.exists() and not link.is_symlink():
            os.symlink(os.path.relpath(target, fold), link, target_is_directory=True)


def _finished(fold: Path, variants: Optional[Sequence[str]]) -> bool:
    """True when ``fold`` finished (its ``loso.json``) with every variant asked for."""
    p = fold / DONE
    if not p.is_file():
        return False
    try:
        done = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return not variants or set(variants) <= set(done.get("variants", ()))


def run_loso(cfg: Config, out: str | Path, variants: Optional[Sequence[str]] = None,
             subjects: Optional[Sequence[int]] = None, log: Optional[Callable[[str], None]] = None,
             fit: Optional[FitStage] = None, execute: Optional[RunRows] = None) -> dict:
    """The within-subject ablation in ``out``, then one fold per subject (module docstring); returns
    ``{'folds': {subject: fold dir}, 'skipped': [subjects], 'summary': DataFrame, 'report': path}``.

    ``subjects``: the subjects to reconstruct and to hold out (default: every subject of the evaluation split).
    ``fit`` / ``execute``: as :func:`neuroimagen.runs.evaluation.ablation`."""
    log = log or _log.info
    if cfg.data.holdout_subject is not None:
        raise ConfigError(f"data.holdout_subject: {cfg.data.holdout_subject} is one fold's setting; eval.protocol: "
                          "loso sets it for every subject in turn (leave it null)")
    run_dir = make_dir(Path(out).resolve())
    ablation(cfg, run_dir, variants, subjects, log=log, fit=fit, execute=execute)
    data_cfg = prepare_data(cfg, run_dir, log)  # the twin the within run synthesised, when data.eeg is unset
    rec = load_recording(data_cfg.data, check_images=False)
    available = subjects_of(rec.dataset(cfg.eval.split, image_mode="none"))
    wanted = [int(s) for s in (subjects or cfg.eval.subjects or available)]
    if len(subjects_of(rec)) < 2:
        raise ConfigError(f"eval.protocol: loso needs at least 2 subjects, {rec.source} has {subjects_of(rec)}")
    folds, skipped = {}, []
    for i, s in enumerate(wanted, start=1):
        fold = fold_dir(run_dir, s)
        folds[s] = fold
        if _finished(fold, variants):
            log(f"loso: fold {i}/{len(wanted)} (subject {s} held out) already finished in {fold}; remove it to redo it")
            skipped.append(s)
            continue
        log(f"loso: fold {i}/{len(wanted)}: training on subjects {[t for t in subjects_of(rec) if t != s]}, "
            f"testing on subject {s} -> {fold}")
        mark(make_dir(fold), "run", "neuroimagen ablation (eval.protocol: loso fold)")  # a run: report, --run work on it
        _share_caches(run_dir, fold)
        ablation(fold_config(data_cfg, s), fold, variants, None, log=log, fit=fit, execute=execute)
        state = json.loads((fold / STATE).read_text(encoding="utf-8"))
        write_text(fold / DONE, json.dumps({"subject": s, "variants": state["variants"],
                                            "fingerprint": state["fingerprint"],
                                            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                                           indent=1))
    summary = write_loso_results(run_dir, wanted)
    report = write_report(run_dir)
    log(f"loso: {len(wanted)} folds ({len(skipped)} reused) -> {run_dir / SUMMARY}; report -> {report}")
    return {"folds": folds, "skipped": skipped, "summary": summary, "report": report}


def finished_folds(run_dir: str | Path) -> list[int]:
    """The subjects whose fold in ``run_dir`` finished (``loso/sub-XX/loso.json``), sorted."""
    out = []
    for p in sorted((Path(run_dir) / FOLDS).glob(f"sub-*/{DONE}")):
        try:
            out.append(int(json.loads(p.read_text(encoding="utf-8"))["subject"]))
        except (OSError, KeyError, TypeError, ValueError):  # a damaged marker: that fold counts as unfinished
            continue
    return sorted(out)


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: not found ({what})")
    try:
        return pd.read_csv(path, dtype={"subject": str})
    except Exception as exc:  # noqa: BLE001 - pandas raises a zoo of errors
        raise DataError(f"{path}: unreadable ({exc.__class__.__name__}: {exc})") from None


def reduce_folds(per_sample: pd.DataFrame, state: dict) -> pd.DataFrame:
    """The folds' concatenated per-image table reduced as ``evaluate`` reduces one run's (same statistics, same
    seeds): per-subject rows and the pooled ``all`` row, ACC withheld when the classifier misses a concept."""
    ev, clf = state["eval"], state["classifier"]
    num_classes = len(per_sample["probs"].iloc[0])
    lut = clf.get("label_to_class", list(range(num_classes)) if clf.get("kind") == "judge" else None)
    st = (state.get("suite") or {}).get("statistics") or {}
    stats = Statistics(**{k: v for k, v in st.items() if k in Statistics.__dataclass_fields__}, seed=state["seed"])
    summary = summarize(per_sample, k=ev["top_k"], is_splits=ev["is_splits"], is_seed=state["seed"],
                        label_to_class=lut, stats=stats)
    labels = per_sample.drop_duplicates(["subject", "item"])["label"].to_numpy()
    if acc_unavailable(clf, labels, state["data"].get("split", "evaluated")):
        summary = withhold(summary, (*ACC_COLUMNS, *(("is",) if clf.get("kind") == "judge" else ())))
    return summary


def write_loso_results(run_dir: str | Path, subjects: Sequence[int]) -> pd.DataFrame:
    """``results/summary_loso.csv``, ``retrieval_loso.csv`` and ``loso.json`` from the within run and the finished
    folds of ``subjects`` (module docstring); returns the summary table."""
    run_dir = Path(run_dir)
    within = _read_csv(run_dir / "results" / "summary.csv", "the within-subject summary: run `neuroimagen evaluate`")
    frames, states, retrieval = [], {}, []
    for s in subjects:
        fold = fold_dir(run_dir, s)
        if not (fold / DONE).is_file():
            raise DataError(f"{fold}: fold of subject {s} not finished; re-run the loso protocol (finished folds are kept)")
        ps = fold / "results" / "per_sample.parquet"
        if not ps.is_file():
            raise DataError(f"{ps}: not found; re-run the loso protocol (finished steps are reused)")
        df = pd.read_parquet(ps)
        frames.append(df[df["subject"].astype(str) == str(s)])
        states[s] = json.loads((fold / STATE).read_text(encoding="utf-8"))
        rt = fold / "results" / "retrieval.csv"
        if rt.is_file():
            r = pd.read_csv(rt, dtype={"subject": str, "control": str, "embedding": str})
            retrieval.append(r[r["subject"] == str(s)])
    loso = reduce_folds(pd.concat(frames, ignore_index=True), states[subjects[0]])
    keep = {str(s) for s in subjects} | {"all"}
    within = within[within["subject"].isin(keep)].drop(columns=["flags"], errors="ignore")
    table = pd.concat([within.assign(protocol="within"), loso.assign(protocol="loso")], ignore_index=True)
    table = table[["protocol", *[c for c in table.columns if c != "protocol"]]]
    with atomic_path(run_dir / SUMMARY) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    if retrieval:
        _write_retrieval(run_dir, pd.concat(retrieval, ignore_index=True), keep)
    write_text(run_dir / PROTOCOL, json.dumps({
        "protocol": "leave-one-subject-out: every stage trained and selected on the other subjects' train / val "
                    "trials, scored on the held-out subject's test trials (the trials the within-subject run scores)",
        "folds": {str(s): {"dir": str(fold_dir(run_dir, s).relative_to(run_dir)),
                           "trained_on_subjects": _trained_on(fold_dir(run_dir, s)),
                           "ldm": states[s]["ldm"].get("identity"), "classifier": states[s]["classifier"].get("identity")}
                  for s in subjects},
        "pooled": "loso 'all' rows: the folds' per-image tables concatenated and reduced once (means over every "
                  "held-out trial, trial-bootstrap intervals); within 'all' rows: the within-subject run's",
        "pooled_whole_set": _whole_set_note(states),
        "provenance": provenance()}, indent=1, default=str))
    return table


def _whole_set_note(states: dict) -> str:
    """Whether the pooled LOSO IS / FID / KID mix classifiers: each fold scores with the judge of its own training
    images (one judge when the folds' training images are the same)."""
    judges = sorted({str(st["classifier"].get("identity")) for st in states.values()})
    if len(judges) == 1:
        return f"IS, FID and KID of the pooled LOSO rows: one classifier for every fold ({judges[0]})"
    return (f"IS, FID and KID of the pooled LOSO rows pool {len(judges)} classifiers (each fold's judge is trained on "
            "its own training images): compare them with care; the per-subject rows use one classifier each")


def _trained_on(fold: Path) -> Optional[list[int]]:
    """The subjects of the fold's stage-1 training split, as its ``encoder/metrics.json`` records them."""
    try:
        return json.loads((fold / "encoder" / "metrics.json").read_text(encoding="utf-8"))["data"]["train"]["subjects"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None


def _write_retrieval(run_dir: Path, folds: pd.DataFrame, keep: set[str]) -> None:
    """``results/retrieval_loso.csv``: within rows, the folds' rows and their trial-weighted pooled row."""
    path = run_dir / "results" / "retrieval.csv"
    within = pd.read_csv(path, dtype={"subject": str, "control": str}) if path.is_file() else pd.DataFrame()
    if len(within):
        within = with_embedding(within[within["subject"].isin(keep)]).assign(protocol="within")
    folds = with_embedding(folds).assign(protocol="loso")
    pooled = []
    for (_, control, k, top), g in folds.groupby(["embedding", "control", "k", "top"], sort=False):
        w = g["n_queries"].astype(float)
        pooled.append({**g.iloc[0].to_dict(), "subject": "all", "accuracy": float((g["accuracy"] * w).sum() / w.sum()),
                       "n_queries": int(w.sum())})
    table = pd.concat([within, folds, pd.DataFrame(pooled)], ignore_index=True)
    table = table[["protocol", *[c for c in table.columns if c != "protocol"]]]
    with atomic_path(run_dir / RETRIEVAL) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
