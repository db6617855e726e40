"""The per-group reduction of the per-image scores: the numbers of ``results/summary.csv``.

:func:`summarize` reduces the per-image table once per (subject, variant) group and once per variant
over all subjects (``subject == 'all'``): ACC mean, ACC max over the samples of one EEG trial (mean over
trials), chance k/N, Inception Score over the group's generations (a whole-set statistic, never
averaged over batches), SSIM mean/std, and the classifier's top-1 accuracy on the GT images. A pure
function of the DataFrame.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from neuroimagen.metrics.inception_score import inception_score


def summarize(df: pd.DataFrame, k: int, is_splits: int) -> pd.DataFrame:
    """Per (subject, variant) and pooled (subject 'all') rows; see the module docstring.

    ``df``: the per-image table (one row per generated image: ``subject``, ``variant``, ``item``, ``sample``,
    ``probs``, ``acc_hit``, ``acc_n``, ``ssim``, ``judge_gt_top1``, ``label``); ``k``: the top-k of the N-way
    protocol (chance is k / N); ``is_splits``: Inception Score splits (``min(is_splits, n)`` per group).
    """

    def reduce(sub, subject: str, variant: str) -> dict:
        sub = sub.sort_values(["subject", "item", "sample"], kind="stable")
        probs = torch.from_numpy(np.stack(sub["probs"].to_numpy()).astype(np.float64))
        splits = min(is_splits, len(sub))
        is_mean, is_std = inception_score(probs, splits=splits) if len(sub) else (float("nan"), float("nan"))
        trials = sub.groupby(["subject", "item"], sort=True)
        gt = trials.first()
        n_eff = int(sub["acc_n"].iloc[0])
        return {"subject": subject, "variant": variant, "n": len(sub), "n_eeg": len(gt),
                "acc": float(sub["acc_hit"].mean()), "acc_max": float(trials["acc_hit"].max().mean()),
                "acc_chance": k / n_eff, "acc_n": n_eff, "is": is_mean, "is_std": is_std, "is_splits": splits,
                "ssim": float(sub["ssim"].mean()), "ssim_std": float(sub["ssim"].std(ddof=0)),
                "judge_gt_acc": float((gt["judge_gt_top1"] == gt["label"]).mean())}

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
