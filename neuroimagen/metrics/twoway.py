"""Feature-space metrics of the MindEye reconstruction suite: two-way identification and correlation distance.

Both take features already extracted by a feature network (``neuroimagen.models.feature_nets``) from the
reconstructions (``pred_feats``) and their ground-truth images (``gt_feats``), row i of one belonging to row i
of the other; any trailing shape is flattened, ``(B, ...) -> (B, D)``, as the public code's ``.flatten(1)``.

Source: ``two_way_identification`` and the EfficientNet/SwAV distance cells of MindEye 1
``src/Reconstruction_Metrics.py`` (MedARC-AI/fMRI-reconstruction-NSD), unchanged in MindEye 2
``src/final_evaluations.ipynb`` (MedARC-AI/MindEyeV2)::

    r = np.corrcoef(reals, preds)[:N, N:]      # r[i, j] = corr(gt_i, pred_j)
    congruents = np.diag(r)                    # corr(gt_j, pred_j)
    success_cnt = np.sum(r < congruents, 0)    # per reconstruction j: #{i : corr(gt_i, pred_j) < corr(gt_j, pred_j)}
    perf = np.mean(success_cnt) / (N - 1)

and ``np.array([scipy.spatial.distance.correlation(gt[i], fake[i]) for i in range(N)]).mean()``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _flat_pair(pred_feats: Tensor, gt_feats: Tensor, what: str, min_items: int) -> tuple[Tensor, Tensor]:
    for name, x in (("pred_feats", pred_feats), ("gt_feats", gt_feats)):
        if not isinstance(x, Tensor) or x.ndim < 2:
            raise ValueError(f"{what}: {name} must be a (B, D, ...) feature tensor, got shape "
                             f"{tuple(getattr(x, 'shape', ()))}")
    if pred_feats.shape != gt_feats.shape:
        raise ValueError(f"{what}: pred_feats and gt_feats must have equal shapes, got "
                         f"{tuple(pred_feats.shape)} vs {tuple(gt_feats.shape)}")
    if pred_feats.shape[0] < min_items:
        raise ValueError(f"{what}: needs at least {min_items} items, got B={pred_feats.shape[0]}")
    out = []
    for name, x in (("pred_feats", pred_feats), ("gt_feats", gt_feats)):
        x = x.detach().to(torch.float64).flatten(1)  # (B, D)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{what}: {name} contains non-finite values")
        x = x - x.mean(1, keepdim=True)
        norm = x.norm(dim=1, keepdim=True)  # (B, 1)
        if bool((norm == 0).any()):
            i = int((norm[:, 0] == 0).nonzero()[0])
            raise ValueError(f"{what}: {name} row {i} is constant; its correlation is undefined")
        out.append(x / norm)  # rows centred and unit-norm: a dot product is a Pearson r
    return out[0], out[1]


def two_way_identification(pred_feats: Tensor, gt_feats: Tensor) -> tuple[Tensor, float]:
    """MindEye's two-way identification: ``(per-item scores (B,) float64 in [0, 1], their mean)``.

    For reconstruction j, the score is the fraction of the other ground-truth images i != j whose Pearson
    correlation with reconstruction j is **strictly lower** than that of its own ground truth:
    ``#{i != j : r(gt_i, pred_j) < r(gt_j, pred_j)} / (B - 1)``.  Ties count as failures (the public code's
    ``<``); chance is 0.5, a perfect score 1.  The mean over j is the number MindEye reports (e.g.
    "AlexNet(2)"); the per-item scores are what a bootstrap over test trials resamples.

    ``pred_feats`` and ``gt_feats`` have equal shapes (B, ...) with B >= 2, flattened to (B, D); correlations
    in float64 as ``np.corrcoef``.  A constant feature row (undefined correlation) raises ``ValueError``.
    Source: ``two_way_identification`` in MindEye's ``src/Reconstruction_Metrics.py``
    (MedARC-AI/fMRI-reconstruction-NSD; the same in MindEyeV2 ``src/final_evaluations.ipynb``).
    """
    p, g = _flat_pair(pred_feats, gt_feats, "two_way_identification", min_items=2)
    n = p.shape[0]
    r = (g @ p.T).clamp(-1, 1)  # (B, B): r[i, j] = corr(gt_i, pred_j)
    congruent = r.diagonal()  # (B,): r[j, j], read from the same matrix so that equal rows compare equal
    wins = (r < congruent[None, :]).sum(0)  # (B,): the diagonal never counts (r[j, j] < r[j, j] is false)
    scores = wins.to(torch.float64) / (n - 1)
    return scores, float(scores.mean())


def correlation_distance(pred_feats: Tensor, gt_feats: Tensor) -> tuple[Tensor, float]:
    """Per-pair correlation distance ``1 - r(pred_i, gt_i)`` in [0, 2] and its mean (lower is better).

    This is ``scipy.spatial.distance.correlation(gt[i], fake[i])``, averaged over pairs, as MindEye reports
    for EfficientNet-B1 ("EffNet-B") and SwAV-ResNet-50 ("SwAV") ``avgpool`` features.  Shapes (B, ...) with
    B >= 1, flattened to (B, D); float64.  A constant feature row raises ``ValueError``.
    """
    p, g = _flat_pair(pred_feats, gt_feats, "correlation_distance", min_items=1)
    d = 1.0 - (p * g).sum(1).clamp(-1, 1)  # (B,)
    return d, float(d.mean())
