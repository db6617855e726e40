"""The field's feature-based reconstruction metrics, per generated image, in the scoring pass (DESIGN sec. 3b).

:class:`Suite` holds the feature networks (loaded once per scoring actor) and, per subject, the features of that
subject's *gallery*: the distinct ground-truth images of its evaluated trials, in row order. For each generated
image j of a subject it writes:

* ``twoway_<net>``: MindEye's two-way identification against the gallery,
  ``#{i != own : r(gt_i, pred_j) < r(gt_own, pred_j)} / (G - 1)`` (Pearson r of flattened features, float64;
  ties count as failures; chance 0.5). With one generation per gallery image this is exactly
  :func:`~neuroimagen.metrics.twoway.two_way_identification`'s per-item score; with several samples per trial
  each sample is scored against the same gallery and the group mean averages them;
* ``dist_<net>``: the correlation distance ``1 - r(pred_j, gt_own)`` (EfficientNet-B1, SwAV), and
  ``dist_<net>_chance``: its mean over the other gallery images (the distance of an unrelated target);
* ``fid_feats`` / ``fid_gt``: the FID network's raw features of the generation and of its ground truth, reduced
  per group into FID and KID by :func:`~neuroimagen.metrics.summary.summarize`.

The gallery is per subject, so a row's numbers do not depend on which other subjects or variants were run, nor
on the batch it came in. Networks are callables ``images (B, 3, H, W) in [0, 1] -> {key: (B, D) features}``
(:class:`~neuroimagen.models.feature_nets.FeatureNet`, or the judge CNN's pooled features).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

Extractor = Callable[[Tensor], Mapping[str, Tensor]]


def _normalise(x: Tensor) -> Tensor:
    """Rows centred and scaled to unit norm (float64), so a dot product is a Pearson r; a constant row stays 0."""
    x = x.detach().to(torch.float64).flatten(1)
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)


class Suite:
    """Per-image feature metrics against a per-subject gallery (see the module docstring).

    Args:
        extractors: name -> feature callable; together they must produce every key below.
        twoway: feature keys scored by two-way identification (``twoway_<key>``).
        distance: feature keys scored by correlation distance (``dist_<key>``, ``dist_<key>_chance``).
        fid: the feature key whose raw features go to ``fid_feats`` / ``fid_gt``, or None.
        load_gt: ``load_gt(path, size) -> (3, size, size)`` ground-truth image (the scorer's cached loader).
        gallery: subject -> the ground-truth image paths of its gallery (distinct, in row order).
    """

    def __init__(self, extractors: Mapping[str, Extractor], *, twoway: Sequence[str], distance: Sequence[str],
                 fid: Optional[str], load_gt: Callable[[str, int], Tensor], gallery: Mapping[str, Sequence[str]]):
        self.extractors = dict(extractors)
        self.twoway, self.distance, self.fid = list(twoway), list(distance), fid
        self.load_gt = load_gt
        self.gallery = {str(s): list(dict.fromkeys(str(p) for p in paths)) for s, paths in gallery.items()}
        self._cache: dict[tuple[str, int], tuple[dict[str, int], dict[str, Tensor], dict[str, Tensor]]] = {}
        self._mismatch: dict[tuple[str, str, int], str] = {}

    @property
    def keys(self) -> list[str]:
        return list(dict.fromkeys(self.twoway + self.distance + ([self.fid] if self.fid else [])))

    def features(self, images: Tensor, known: Optional[Mapping[str, Tensor]] = None) -> dict[str, Tensor]:
        """{key: (B, D) float32} for every key the suite scores, from each network once; ``known``: features the
        caller already has for these images (e.g. the judge's, from its classification pass), by network name."""
        out: dict[str, Tensor] = {}
        for name, fn in self.extractors.items():
            if known is not None and name in known:
                out[name] = known[name].detach().float().cpu().flatten(1)
                continue
            for key, value in fn(images).items():
                if key in self.keys:
                    out[key] = value.detach().float().cpu().flatten(1)
        missing = [k for k in self.keys if k not in out]
        if missing:
            raise ValueError(f"suite: no network produced feature(s) {', '.join(missing)}")
        return out

    def _subject(self, subject: str, size: int):
        """(path -> gallery index, {key: normalised (G, D)}, {key: raw (G, D)}) of a subject, computed once."""
        key = (subject, size)
        if key not in self._cache:
            paths = self.gallery.get(subject)
            if not paths:
                raise ValueError(f"suite: subject {subject} has no gallery of ground-truth images")
            raw = self.features(torch.stack([self.load_gt(p, size) for p in paths])) if self.keys else {}
            self._cache[key] = ({p: i for i, p in enumerate(paths)}, {k: _normalise(v) for k, v in raw.items()}, raw)
        return self._cache[key]

    def __call__(self, images: Tensor, subjects: Sequence[str], gt_paths: Sequence[str],
                 known: Optional[Mapping[str, Tensor]] = None) -> dict[str, np.ndarray]:
        """Per-row columns (module docstring) for generated ``images`` (B, 3, R, R) of ``subjects`` whose ground
        truths are ``gt_paths``; every ground truth must be in its subject's gallery. ``known``: see
        :meth:`features`."""
        B, R = images.shape[0], images.shape[-1]
        feats = self.features(images, known) if self.keys else {}
        cols: dict[str, np.ndarray] = {f"twoway_{k}": np.full(B, np.nan) for k in self.twoway}
        for k in self.distance:
            cols[f"dist_{k}"], cols[f"dist_{k}_chance"] = np.full(B, np.nan), np.full(B, np.nan)
        by_subject: dict[str, list[int]] = {}
        for i, subj in enumerate(subjects):
            by_subject.setdefault(str(subj), []).append(i)
        fid_gt = [None] * B
        for subj, rows in by_subject.items():
            index, norm, raw = self._subject(subj, R)
            own = []
            for i in rows:
                j = index.get(str(gt_paths[i]))
                if j is None:
                    raise ValueError(f"suite: ground truth {gt_paths[i]} is not in subject {subj}'s gallery")
                own.append(j)
            G, idx, own_t = len(index), torch.tensor(rows), torch.tensor(own)
            mine = torch.zeros(len(rows), G, dtype=torch.bool)
            mine[torch.arange(len(rows)), own_t] = True  # (b, G): each row's own ground truth
            for k in self.twoway + self.distance:
                r = (_normalise(feats[k][idx]) @ norm[k].T).clamp(-1, 1)  # (b, G): r(gt_g, pred_i)
                congruent = r[torch.arange(len(rows)), own_t]  # (b,)
                if k in self.twoway and G > 1:
                    wins = ((r < congruent[:, None]) & ~mine).sum(1)
                    cols[f"twoway_{k}"][rows] = (wins.double() / (G - 1)).numpy()
                if k in self.distance:
                    cols[f"dist_{k}"][rows] = (1.0 - congruent).numpy()
                    if G > 1:
                        cols[f"dist_{k}_chance"][rows] = ((1.0 - r).masked_fill(mine, 0).sum(1) / (G - 1)).numpy()
            if self.fid:
                for i, j in zip(rows, own):
                    fid_gt[i] = raw[self.fid][j].numpy().astype(np.float32)
        if self.fid:
            cols["fid_feats"] = feats[self.fid].numpy().astype(np.float32)  # (B, D), one row per image
            cols["fid_gt"] = np.stack(fid_gt)
        return cols

    def mismatch_paths(self, subjects: Sequence[str], gt_paths: Sequence[str], seeds: Sequence[int]) -> list[str]:
        """For each row, another gallery image of its subject (uniform over the others, drawn with the row's
        ``seed_mismatch``); the row's own ground truth when its gallery holds a single image."""
        out = []
        for s, p, seed in zip(subjects, gt_paths, seeds):
            key = (str(s), str(p), int(seed))  # one draw per trial: its samples and variants share it
            if key not in self._mismatch:
                paths = self.gallery.get(str(s)) or [str(p)]
                others = [q for q in paths if q != str(p)]
                self._mismatch[key] = others[int(np.random.default_rng(int(seed)).integers(len(others)))] \
                    if others else str(p)
            out.append(self._mismatch[key])
        return out
