"""The per-group reduction of the per-image scores: the numbers of ``results/summary.csv`` and ``tests.csv``.

:func:`summarize` reduces the per-image table once per (subject, variant) group and once per variant
over all subjects (``subject == 'all'``): ACC mean, ACC max over the samples of one EEG trial (mean over
trials), chance k/N, Inception Score over the group's generations (a whole-set statistic, never
averaged over batches; one per network whose probabilities the table holds), SSIM mean/std, and the
classifier's top-1 accuracy on the GT images in the classifier's own label space. With :class:`Statistics`
it adds the field's suite (every per-image column the table holds: PixCorr, two-way identification,
correlation distances, their chance baselines; FID and KID from the stored features) and a seeded
percentile-bootstrap confidence interval (``<metric>_lo`` / ``<metric>_hi``) of every number, resampling test
trials (all samples of a drawn trial together). :func:`compare_variants` runs the paired permutation tests
between variants. Pure functions of the DataFrame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from neuroimagen.metrics.fid import frechet_distance, kernel_inception_distance
from neuroimagen.metrics.inception_score import MIN_SPLIT_SIZE, inception_score, is_split_count
from neuroimagen.metrics.stats import bootstrap_ci, paired_permutation_test

# per-image probability column -> the summary column of its Inception Score (``<name>``, ``<name>_std``)
IS_COLUMNS = {"probs": "is", "is_probs": "is_inception_v3"}
# per-image metric columns of the suite, by prefix (the summary column keeps the per-image column's name)
SUITE_PREFIXES = ("pixcorr", "twoway_", "dist_")
# the summary column of a per-image column with another name
RENAMED = {"acc_hit": "acc"}
TWO_WAY_CHANCE = 0.5


@dataclass(frozen=True)
class Statistics:
    """How the suite's numbers and intervals are computed (``eval.suite``): bootstrap replicates of per-image
    means (``n_boot``) and of whole-set metrics (``n_boot_whole``: IS, FID), the interval's ``level``, KID's
    subsets, the permutations of each variant test, and the seed of every draw."""

    n_boot: int = 2000
    n_boot_whole: int = 200
    level: float = 0.95
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    n_perm: int = 10000
    seed: int = 0


def per_image_metrics(df: pd.DataFrame) -> list[str]:
    """The per-image metric columns of a table, in report order: ACC hits, SSIM, then the suite's columns."""
    cols = [c for c in ("acc_hit", "ssim", "ssim_chance") if c in df.columns]
    return cols + [c for c in df.columns if c.startswith(SUITE_PREFIXES)]


def _ci(values: np.ndarray, groups: Optional[np.ndarray], st: Statistics) -> tuple[float, float]:
    ok = np.isfinite(values)
    if ok.sum() < 2 or (groups is not None and len(set(groups[ok])) < 2):
        return float("nan"), float("nan")
    r = bootstrap_ci(values[ok], n_boot=st.n_boot, level=st.level, groups=None if groups is None else groups[ok],
                     seed=st.seed)
    return r.low, r.high


def _trial_bootstrap(n_trials: int, st: Statistics):
    """``st.n_boot_whole`` index vectors, each ``n_trials`` trials drawn with replacement (seeded)."""
    g = torch.Generator().manual_seed(int(st.seed))
    return torch.randint(n_trials, (st.n_boot_whole, n_trials), generator=g).numpy()


def _interval(reps: Sequence[float], level: float) -> tuple[float, float]:
    reps = np.asarray([r for r in reps if np.isfinite(r)], dtype=np.float64)
    if len(reps) < 2:
        return float("nan"), float("nan")
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps, [a, 1.0 - a])
    return float(lo), float(hi)


def summarize(df: pd.DataFrame, k: int, is_splits: int, *, is_seed: int,
              label_to_class: Optional[Sequence[int]] = None, stats: Optional[Statistics] = None) -> pd.DataFrame:
    """Per (subject, variant) and pooled (subject 'all') rows; see the module docstring.

    ``df``: the per-image table (one row per generated image: ``subject``, ``variant``, ``item``, ``sample``,
    ``probs``, ``acc_hit``, ``acc_n``, ``ssim``, ``judge_gt_top1``, ``label``; optionally ``is_probs``, the IS
    network's softmax); ``k``: the top-k of the N-way protocol (chance is k / N).

    Inception Score, per group of N images: the rows are sorted by (subject, trial, sample), shuffled with
    ``torch.Generator().manual_seed(is_seed)`` and cut into ``is_split_count(N, is_splits)`` =
    ``clamp(N // 50, 1, is_splits)`` splits (:func:`~neuroimagen.metrics.inception_score.inception_score`);
    ``is_n`` and ``is_splits`` record N and the split count. ``is`` comes from ``probs`` (the ACC classifier),
    ``is_inception_v3`` from ``is_probs`` when the table has it.

    ``judge_gt_acc``: the fraction of the group's EEG trials whose GT image the classifier's top-1 puts in the
    trial's class, ``label_to_class[label]`` being the dataset label's index among the classifier's classes
    (identity for a judge trained on the dataset's labels, a WNID lookup for an ImageNet classifier). Without
    ``label_to_class`` the label spaces cannot be compared and ``judge_gt_acc`` is NaN (never a false ~0).

    With ``stats`` (:class:`Statistics`): every per-image metric column (:func:`per_image_metrics`) is averaged
    per group (``acc_hit`` as ``acc``); ``*_chance`` columns are the chance baselines (``twoway_<net>_chance`` =
    0.5 by definition); ``fid`` / ``kid`` (``kid_std`` over subsets) compare the group's ``fid_feats`` with the
    ``fid_gt`` of its trials' ground truths (one per trial) (``fid_n``, ``fid_n_ref``, ``kid_subset_size`` recorded). Every mean gets a
    percentile-bootstrap interval ``<col>_lo`` / ``<col>_hi`` over test trials (``stats.n_boot`` replicates, one
    trial = all its samples); ``acc_max`` over per-trial maxima; ``is*`` and ``fid`` recompute the whole-set
    metric on ``stats.n_boot_whole`` trial resamples. KID reports its subset std instead of an interval.
    """
    lut = None if label_to_class is None else np.asarray(list(label_to_class), dtype=np.int64)
    prob_cols = [c for c in IS_COLUMNS if c in df.columns and df[c].notna().all()]

    def reduce(sub, subject: str, variant: str) -> dict:
        sub = sub.sort_values(["subject", "item", "sample"], kind="stable")
        splits = is_split_count(len(sub), is_splits, MIN_SPLIT_SIZE)
        out = {"subject": subject, "variant": variant, "n": len(sub)}
        scores = {}
        for col in prob_cols:
            probs = torch.from_numpy(np.stack(sub[col].to_numpy()).astype(np.float64))
            g = torch.Generator().manual_seed(int(is_seed))
            mean, std = inception_score(probs, splits=splits, generator=g) if len(sub) else (float("nan"),) * 2
            scores.update({IS_COLUMNS[col]: mean, f"{IS_COLUMNS[col]}_std": std})
        trials = sub.groupby(["subject", "item"], sort=True)
        gt = trials.first()
        n_eff = int(sub["acc_n"].iloc[0])
        if lut is None:
            gt_acc = float("nan")
        else:
            labels = gt["label"].to_numpy().astype(np.int64)
            if labels.min() < 0 or labels.max() >= len(lut):
                raise ValueError(f"label_to_class has {len(lut)} entries, but the table has label {int(labels.max())}")
            gt_acc = float((gt["judge_gt_top1"].to_numpy() == lut[labels]).mean())
        out.update({"n_eeg": len(gt), "acc": float(sub["acc_hit"].mean()), "acc_max": float(trials["acc_hit"].max().mean()),
                    "acc_chance": k / n_eff, "acc_n": n_eff, "is": scores.get("is", float("nan")),
                    "is_std": scores.get("is_std", float("nan")), "is_splits": splits, "is_n": len(sub),
                    **{c: v for c, v in scores.items() if c not in ("is", "is_std")},
                    "ssim": float(sub["ssim"].mean()), "ssim_std": float(sub["ssim"].std(ddof=0)),
                    "judge_gt_acc": gt_acc})
        if stats is not None:
            out.update(_suite(sub, splits, prob_cols, stats))
        return out

    rows = []
    variants = list(dict.fromkeys(df["variant"]))
    subjects = sorted(set(df["subject"]), key=lambda s: (len(s), s))
    for v in variants:
        for s in subjects:
            sub = df[(df["variant"] == v) & (df["subject"] == s)]
            if len(sub):
                rows.append(reduce(sub, s, v))
        rows.append(reduce(df[df["variant"] == v], "all", v))
    return pd.DataFrame(rows)


def _suite(sub: pd.DataFrame, splits: int, prob_cols: Sequence[str], st: Statistics) -> dict:
    """The suite's columns and every interval of one group (rows sorted by subject, trial, sample)."""
    out: dict = {}
    trial = sub["subject"].astype(str).to_numpy() + "/" + sub["item"].astype(str).to_numpy()  # (N,) trial ids
    for col in per_image_metrics(sub):
        name = RENAMED.get(col, col)
        values = sub[col].to_numpy(dtype=np.float64)
        if name not in ("acc", "ssim"):
            out[name] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        out[f"{name}_lo"], out[f"{name}_hi"] = _ci(values, trial, st)
        if col.startswith("twoway_"):
            out[f"{col}_chance"] = TWO_WAY_CHANCE
    maxima = sub.groupby(["subject", "item"], sort=True)["acc_hit"].max().to_numpy(dtype=np.float64)
    out["acc_max_lo"], out["acc_max_hi"] = _ci(maxima, None, st)
    ids, codes = np.unique(trial, return_inverse=True)
    codes = codes.reshape(-1)
    members = [np.flatnonzero(codes == t) for t in range(len(ids))]
    draws = _trial_bootstrap(len(ids), st) if len(ids) >= 2 else np.zeros((0, 0), dtype=np.int64)
    for col in prob_cols:
        probs = torch.from_numpy(np.stack(sub[col].to_numpy()).astype(np.float64))
        reps = []
        for d in draws:
            rows = np.concatenate([members[t] for t in d])
            n_split = is_split_count(len(rows), splits, MIN_SPLIT_SIZE)
            reps.append(inception_score(probs[rows], splits=n_split, generator=torch.Generator().manual_seed(st.seed))[0])
        out[f"{IS_COLUMNS[col]}_lo"], out[f"{IS_COLUMNS[col]}_hi"] = _interval(reps, st.level)
    if "fid_feats" in sub.columns and sub["fid_feats"].notna().all():
        out.update(_distances(sub, members, draws, st))
    return out


def _distances(sub: pd.DataFrame, members: list, draws: np.ndarray, st: Statistics) -> dict:
    """FID and KID of a group's generations against the ground truths of its trials, FID's bootstrap interval.

    The reference set holds one ground truth per trial of the group (in the pooled group an image seen by several
    subjects counts once per subject, as its generations do), so a bootstrap replicate resamples both sets
    with the same trials."""
    gen = torch.from_numpy(np.stack(sub["fid_feats"].to_numpy()).astype(np.float64))  # (N, D)
    first = np.asarray([m[0] for m in members])  # one row per trial: its ground truth's features
    ref = torch.from_numpy(np.stack(sub["fid_gt"].to_numpy()[first]).astype(np.float64))  # (T, D)
    out = {"fid_n": int(gen.shape[0]), "fid_n_ref": int(ref.shape[0])}
    if gen.shape[0] < 2 or ref.shape[0] < 2:
        return {**out, "fid": float("nan"), "fid_lo": float("nan"), "fid_hi": float("nan"), "kid": float("nan"),
                "kid_std": float("nan"), "kid_subset_size": 0}
    out["fid"] = frechet_distance(gen, ref)
    reps = []
    for d in draws:
        rows = np.concatenate([members[t] for t in d])
        reps.append(frechet_distance(gen[rows], ref[d]))
    out["fid_lo"], out["fid_hi"] = _interval(reps, st.level)
    m = int(min(st.kid_subset_size, gen.shape[0], ref.shape[0]))
    kid, kid_std = kernel_inception_distance(gen, ref, subsets=st.kid_subsets, subset_size=m,
                                             generator=torch.Generator().manual_seed(st.seed))
    out.update(kid=kid, kid_std=kid_std, kid_subset_size=m)
    return out


# the columns that need the classifier's classes to cover the evaluated concepts (ACC's true class is one of
# them); the IS of a judge trained on other concepts too (:func:`withhold`)
ACC_COLUMNS = ("acc", "acc_max", "judge_gt_acc")


def uncovered_labels(labels: Sequence[int], covered: Optional[Sequence[int]]) -> list[int]:
    """The distinct ``labels`` (of the evaluated trials) that are not in ``covered`` (the dataset labels the
    classifier has a class for), sorted; [] when ``covered`` is None (not recorded: taken as covering all)."""
    if covered is None:
        return []
    return sorted(set(int(v) for v in labels) - set(int(v) for v in covered))


def withhold(summary: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """A copy of ``summary`` with each of ``columns`` and its ``_std`` / ``_lo`` / ``_hi`` set to NaN (reported
    as n/a): numbers that exist but measure nothing, e.g. N-way ACC when the classifier has no class for the
    evaluated concepts."""
    out = summary.copy()
    for col in columns:
        for c in (col, f"{col}_std", f"{col}_lo", f"{col}_hi"):
            if c in out.columns:
                out[c] = float("nan")
    return out


def compare_variants(df: pd.DataFrame, comparisons: Sequence[tuple[str, str]], st: Statistics,
                     metrics: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Paired permutation tests between variants, per subject and pooled (``subject == 'all'``).

    For each pair (a, b) of ``comparisons`` whose variants are both in ``df`` and each per-image metric (default
    :func:`per_image_metrics`, chance baselines left out): the metric is averaged over the samples of each test
    trial, the trials of a and b are paired by (subject, trial), and :func:`~neuroimagen.metrics.stats.
    paired_permutation_test` tests mean(a - b) = 0 (two-sided, ``st.n_perm`` sign flips or exact, seeded).
    Columns: subject, a, b, metric, mean_a, mean_b, diff (a - b), p_value, n_trials, n_perm, exact.
    """
    metrics = [m for m in (metrics or per_image_metrics(df)) if not m.endswith("_chance")]
    present = set(df["variant"])
    rows = []
    subjects = sorted(set(df["subject"].astype(str)), key=lambda s: (len(s), s))
    for a, b in comparisons:
        if a not in present or b not in present:
            continue
        for subject in subjects + ["all"]:
            sel = df if subject == "all" else df[df["subject"].astype(str) == subject]
            for m in metrics:
                per_trial = sel.groupby(["variant", "subject", "item"], sort=True)[m].mean()
                if a not in per_trial.index.get_level_values(0) or b not in per_trial.index.get_level_values(0):
                    continue  # a subject without one of the two variants
                ta, tb = per_trial.loc[a], per_trial.loc[b]
                both = ta.index.intersection(tb.index)
                va, vb = ta.loc[both].to_numpy(np.float64), tb.loc[both].to_numpy(np.float64)
                ok = np.isfinite(va) & np.isfinite(vb)
                if not ok.any():
                    continue
                r = paired_permutation_test(va[ok], vb[ok], n_perm=st.n_perm, seed=st.seed)
                rows.append({"subject": subject, "a": a, "b": b, "metric": RENAMED.get(m, m),
                             "mean_a": float(va[ok].mean()), "mean_b": float(vb[ok].mean()), "diff": r.statistic,
                             "p_value": r.p_value, "n_trials": int(ok.sum()), "n_perm": r.n_perm, "exact": r.exact})
    return pd.DataFrame(rows, columns=["subject", "a", "b", "metric", "mean_a", "mean_b", "diff", "p_value",
                                       "n_trials", "n_perm", "exact"])
