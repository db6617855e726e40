"""The per-group reduction of the per-image scores: the numbers of ``results/summary.csv``.

:func:`summarize` reduces the per-image table once per (subject, variant) group and once per variant
over all subjects (``subject == 'all'``): ACC mean, ACC max over the samples of one EEG trial (mean over
trials), chance k/N, Inception Score over the group's generations (a whole-set statistic, never
averaged over batches; one per network whose probabilities the table holds), SSIM mean/std, and the
classifier's top-1 accuracy on the GT images in the classifier's own label space. A pure function of the
DataFrame.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from neuroimagen.metrics.inception_score import MIN_SPLIT_SIZE, inception_score, is_split_count

# per-image probability column -> the summary column of its Inception Score (``<name>``, ``<name>_std``)
IS_COLUMNS = {"probs": "is", "is_probs": "is_inception_v3"}


def summarize(df: pd.DataFrame, k: int, is_splits: int, *, is_seed: int,
              label_to_class: Optional[Sequence[int]] = None) -> pd.DataFrame:
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
