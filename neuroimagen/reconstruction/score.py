"""Score: generated rows -> per-image numbers (DESIGN sec. 3), with the classifier injected.

* ``probs`` (K): the classifier's softmax on the generated image; ``judge_top1`` its argmax;
* ``is_probs`` (1000): the Inception Score network's softmax on the generated image (only with an IS network,
  e.g. Inception-v3; without one the IS is computed from ``probs`` and labelled with the classifier);
* ``judge_gt_top1``: the classifier's top-1 on the ground-truth image, the "true class" of the N-way
  protocol (MinD-Vis: not the dataset label);
* ``acc_hit``: the N-way top-k hit rate over ``trials`` seeded draws (one generator per row, seeded by the
  row's ``seed_nway``, so a row's value does not depend on its batch);
* ``ssim``: SSIM(generated, GT) in the configured convention, the GT read at the generated resolution;
* with a :class:`~neuroimagen.reconstruction.suite.Suite` (the field's suite, DESIGN sec. 3b): ``pixcorr``
  (MindEye's PixCorr with the generation's own ground truth), the chance baselines ``pixcorr_chance`` and
  ``ssim_chance`` (the same generation against another trial's ground truth of the subject's gallery, drawn by
  the row's ``seed_mismatch``), and the suite's feature columns (``twoway_<net>``, ``dist_<net>``,
  ``dist_<net>_chance``, ``fid_feats`` / ``fid_gt``);
* ``image`` / ``saliency``: where the generated image and its init image go (paths relative to the run
  directory, :func:`~neuroimagen.reconstruction.images.image_stem`), written only when an image writer is
  given.
"""

from __future__ import annotations

import warnings
from typing import Callable, Literal, Optional

import numpy as np
import torch

from neuroimagen.data.datasets import load_image
from neuroimagen.metrics.nway import effective_n, n_way_top_k_hits
from neuroimagen.metrics.pixcorr import PixStats, pixcorr_from_stats, pixcorr_stats
from neuroimagen.metrics.ssim import SsimTarget, ssim_against, ssim_target
from neuroimagen.models.classifier import Classifier
from neuroimagen.reconstruction.images import image_stem
from neuroimagen.reconstruction.suite import Suite

# the row columns a scored row keeps (the rest of a batch is dropped with the image arrays)
KEEP = ("subject", "variant", "item", "eeg_item", "stem", "label", "class_name", "sample", "seed_z", "seed_noise", "seed_nway",
        "seed_mismatch", "gt")


class Score:
    """Generated rows -> per-image scores (see the module docstring); drops the image arrays.

    Components:
        classifier: the evaluation classifier (a judge or a torchvision model), on its device.
        n_way, top_k, trials: the N-way top-k protocol (``eval.n_way``, ``eval.top_k``, ``eval.trials``).
        ssim_convention, ssim_resolution: the SSIM protocol (``eval.ssim_convention``, ``eval.ssim_resolution``).
        write_image: called as ``write_image(relative_path, (3, H, W) image)`` for every generated image and
            init image (e.g. :class:`~neuroimagen.reconstruction.images.PngWriter`); None writes nothing.
        is_network: the Inception Score network (``eval.is_network``, e.g. Inception-v3 with its own 299 px
            preprocessing), scored in the same pass into ``is_probs``; None: no ``is_probs`` column.
        suite: the field's suite (feature networks and per-subject galleries); None: ACC, IS and SSIM only.
            Its ground truths are read through this scorer's cache (``suite.load_gt`` is replaced).
    """

    def __init__(self, classifier: Classifier, *, n_way: int, top_k: int, trials: int,
                 ssim_convention: Literal["dreamdiffusion", "mindeye"], ssim_resolution: Optional[int],
                 write_image: Optional[Callable[[str, torch.Tensor], None]] = None,
                 is_network: Optional[Classifier] = None, suite: Optional[Suite] = None):
        self.clf = classifier
        self.is_network = is_network
        self.n_way, self.top_k, self.trials = int(n_way), int(top_k), int(trials)
        self.ssim_convention, self.ssim_resolution = ssim_convention, ssim_resolution
        self.write_image = write_image
        self._gt_cache: dict[tuple[str, int], torch.Tensor] = {}
        self._pix_cache: dict[tuple[str, int], PixStats] = {}
        self._ssim_cache: dict[tuple[str, int], SsimTarget] = {}
        self._true_cache: dict[tuple[str, int], int] = {}
        self.suite = suite
        if suite is not None:
            suite.load_gt = self._gt

    def _gt_stats(self, paths: list[str], size: int) -> PixStats:
        """PixCorr's sums of ground-truth images, computed once per (path, size) (a ground truth is scored against
        every variant and sample of its trial, and as another trial's mismatched target)."""
        todo = [p for p in dict.fromkeys(paths) if (p, size) not in self._pix_cache]
        if todo:
            st = pixcorr_stats(torch.stack([self._gt(p, size) for p in todo]))
            for i, p in enumerate(todo):
                self._pix_cache[(p, size)] = st.select(slice(i, i + 1))
        parts = [self._pix_cache[(p, size)] for p in paths]
        return PixStats(*(torch.cat([getattr(q, f) for q in parts]) for f in ("image", "smoothed", "total", "spread",
                                                                                "flat")), parts[0].n)

    def _gt_ssim(self, paths: list[str], size: int) -> SsimTarget:
        """SSIM's side of ground-truth images (preprocessed, locally filtered moments), once per (path, size)."""
        todo = [p for p in dict.fromkeys(paths) if (p, size) not in self._ssim_cache]
        if todo:
            t = ssim_target(torch.stack([self._gt(p, size) for p in todo]), convention=self.ssim_convention,
                            resolution=self.ssim_resolution)
            for i, p in enumerate(todo):
                self._ssim_cache[(p, size)] = t.select(slice(i, i + 1))
        parts = [self._ssim_cache[(p, size)] for p in paths]
        return parts[0]._replace(**{f: torch.cat([getattr(q, f) for q in parts]) for f in ("prepared", "mu", "mu2")})

    def _true_class(self, paths: list[str], size: int) -> torch.Tensor:
        """The classifier's top-1 on each ground-truth image (the N-way protocol's true class), classified once per
        (path, size): a ground truth is shared by every variant and sample of its trial (21 rows in the default
        ablation), and a ViT-H/14 pass is the dearest part of scoring."""
        todo = [p for p in dict.fromkeys(paths) if (p, size) not in self._true_cache]
        if todo:
            top = self.clf.probs(torch.stack([self._gt(p, size) for p in todo])).argmax(1)
            self._true_cache.update({(p, size): int(t) for p, t in zip(todo, top)})
        return torch.tensor([self._true_cache[(p, size)] for p in paths], dtype=torch.long)

    def _gt(self, path: str, size: int) -> torch.Tensor:
        key = (path, size)
        if key not in self._gt_cache:
            self._gt_cache[key] = load_image(path, size)
        return self._gt_cache[key]

    def __call__(self, batch: dict) -> dict:
        images = torch.from_numpy(np.asarray(batch["image"], dtype=np.float32))  # (B, 3, R, R)
        B, R = images.shape[0], images.shape[-1]
        known = None
        if self.suite is not None and "judge" in self.suite.extractors and self.clf.has_features:
            probs, judge_feats = self.clf.probs_and_features(images)  # one pass for ACC and the judge's features
            known = {"judge": judge_feats}
        else:
            probs = self.clf.probs(images)  # (B, K)
        true = self._true_class([str(p) for p in batch["gt"]], R)
        hits = np.zeros(B)
        with warnings.catch_warnings():  # the clamping warning is recorded once, in protocol.json
            warnings.simplefilter("ignore")
            for i in range(B):
                g = torch.Generator().manual_seed(int(batch["seed_nway"][i]))
                hits[i] = float(n_way_top_k_hits(probs[i: i + 1], true[i: i + 1], n=self.n_way, k=self.top_k,
                                                 trials=self.trials, generator=g)[0])
        n_eff, _ = effective_n(self.n_way, probs.shape[1])
        other_paths: list[str] = []
        targets = [str(p) for p in batch["gt"]]
        if self.suite is not None:  # the chance baselines: the same generation against another trial's ground truth
            subjects, gts = [str(x) for x in batch["subject"]], [str(x) for x in batch["gt"]]
            other_paths = self.suite.mismatch_paths(subjects, gts, batch["seed_mismatch"])
        scores = ssim_against(images.double(), [self._gt_ssim(targets, R)] + ([self._gt_ssim(other_paths, R)]
                                                                             if other_paths else []),
                              convention=self.ssim_convention, resolution=self.ssim_resolution)
        ss = scores[0]
        img_paths, init_paths = [], []
        init = np.asarray(batch["init"], dtype=np.float32) if "init" in batch else None
        kinds = np.asarray(batch.get("init_kind", ["noise"] * B)).astype(str)
        for i in range(B):
            rel = image_stem(str(batch["subject"][i]), str(batch["variant"][i]), str(batch["stem"][i]),
                             int(batch["item"][i]), int(batch["sample"][i]))
            img_paths.append(str(rel) + ".png")
            init_paths.append(str(rel) + "-init.png" if kinds[i] != "noise" else "")
            if self.write_image is not None:
                self.write_image(img_paths[-1], images[i])
                if init_paths[-1]:
                    self.write_image(init_paths[-1], torch.from_numpy(init[i]))
        out = {k: batch[k] for k in KEEP if k in batch}
        out.update(judge_gt_top1=true.numpy().astype(np.int64), judge_top1=probs.argmax(1).numpy().astype(np.int64),
                   acc_hit=hits, acc_n=np.full(B, n_eff, dtype=np.int64), ssim=ss.numpy(),
                   probs=probs.numpy().astype(np.float32), image=np.asarray(img_paths, dtype=object),
                   saliency=np.asarray(init_paths, dtype=object))
        if self.suite is not None:
            mine = pixcorr_stats(images)
            pc = pixcorr_from_stats(mine, self._gt_stats(gts, R), constant="nan")
            pc_chance = pixcorr_from_stats(mine, self._gt_stats(other_paths, R), constant="nan")
            out.update(pixcorr=pc.numpy(), pixcorr_chance=pc_chance.numpy(), ssim_chance=scores[1].numpy(),
                       **self.suite(images, subjects, gts, known))
        if self.is_network is not None:
            out["is_probs"] = self.is_network.probs(images).numpy().astype(np.float32)  # (B, 1000)
        return out
