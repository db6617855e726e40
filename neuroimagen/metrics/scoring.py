"""Scoring generated images: the per-batch callable (Ray-free) and the per-group reduction.

:class:`Score` turns a batch of generated rows into per-image numbers (DESIGN sec. 3):

* ``probs`` (K): the injected classifier's softmax on the generated image; ``judge_top1`` its argmax;
* ``judge_gt_top1``: the classifier's top-1 on the ground-truth image, the "true class" of the N-way
  protocol (MinD-Vis: not the dataset label);
* ``acc_hit``: the N-way top-k hit rate over ``trials`` seeded draws (one generator per row, seeded by the
  row's seed, so a row's value does not depend on its batch);
* ``ssim``: SSIM(generated, GT) in the configured convention, the GT read at the generated resolution;

and writes each generated image (and its init image) as PNG under ``results/images``.

:func:`summarize` reduces the per-image table once per (subject, variant) group and once per variant
over all subjects (``subject == 'all'``): ACC mean, ACC max over the samples of one EEG trial (mean over
trials), chance k/N, Inception Score over the group's generations (a whole-set statistic, never
averaged over batches), SSIM mean/std, and the classifier's top-1 accuracy on the GT images.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from neuroimagen.metrics.inception_score import inception_score
from neuroimagen.metrics.nway import effective_n, n_way_top_k_hits
from neuroimagen.metrics.ssim import ssim


def load_classifier_spec(spec: dict):
    """A ``Classifier`` from a plain spec: {'kind': 'judge', 'path': dir} or {'kind': 'torchvision', 'arch',
    'weights', 'image_size'}."""
    from neuroimagen.models.classifier import load_classifier, load_torchvision_classifier

    if spec["kind"] == "judge":
        return load_classifier(spec["path"])
    return load_torchvision_classifier(spec["arch"], spec["weights"], image_size=spec.get("image_size"),
                                       class_names=spec.get("class_names"))


def save_png(image: torch.Tensor, path: Path) -> None:
    """(3, H, W) in [0, 1] -> an 8-bit PNG, written atomically."""
    from PIL import Image

    from neuroimagen.atomic import atomic_path

    arr = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


class Score:
    """Generated rows -> per-image scores (see the module docstring); drops the image arrays."""

    def __init__(self, run_dir: str, classifier: dict, eval_cfg: dict, write_images: bool = True, threads: int = 0,
                 device: str = "cpu"):
        if threads:
            torch.set_num_threads(int(threads))
        self.run_dir = Path(run_dir)
        self.clf = load_classifier_spec(classifier)
        if device.startswith("cuda") and torch.cuda.is_available():
            self.clf.to(device)  # a ViT-H/14 judge belongs on the GPU; probabilities come back on the CPU
        self.ec = eval_cfg
        self.write_images = write_images
        self._gt_cache: dict[tuple[str, int], torch.Tensor] = {}

    def _gt(self, path: str, size: int) -> torch.Tensor:
        from neuroimagen.data.datasets import load_image

        key = (path, size)
        if key not in self._gt_cache:
            self._gt_cache[key] = load_image(path, size)
        return self._gt_cache[key]

    def __call__(self, batch: dict) -> dict:
        from neuroimagen.reconstruction import safe_name

        ec = self.ec
        images = torch.from_numpy(np.asarray(batch["image"], dtype=np.float32))  # (B, 3, R, R)
        B, R = images.shape[0], images.shape[-1]
        gt = torch.stack([self._gt(str(p), R) for p in batch["gt"]])  # (B, 3, R, R)
        probs = self.clf.probs(images)  # (B, K)
        probs_gt = self.clf.probs(gt)
        true = probs_gt.argmax(1)
        hits = np.zeros(B)
        with warnings.catch_warnings():  # the clamping warning is recorded once, in protocol.json
            warnings.simplefilter("ignore")
            for i in range(B):
                g = torch.Generator().manual_seed(int(batch["seed"][i]))
                hits[i] = float(n_way_top_k_hits(probs[i: i + 1], true[i: i + 1], n=ec["n_way"], k=ec["top_k"],
                                                 trials=ec["trials"], generator=g)[0])
        n_eff, _ = effective_n(ec["n_way"], probs.shape[1])
        ss = ssim(images.double(), gt.double(), convention=ec["ssim_convention"], resolution=ec["ssim_resolution"])
        img_paths, init_paths = [], []
        init = np.asarray(batch["init"], dtype=np.float32) if "init" in batch else None
        kinds = np.asarray(batch.get("init_kind", ["noise"] * B)).astype(str)
        for i in range(B):
            rel = (Path("results") / "images" / f"s{batch['subject'][i]}" / safe_name(str(batch["variant"][i]))
                   / f"{batch['stem'][i]}-{int(batch['item'][i])}-{int(batch['sample'][i])}")
            img_paths.append(str(rel) + ".png")
            init_paths.append(str(rel) + "-init.png" if kinds[i] != "noise" else "")
            if self.write_images:
                save_png(images[i], self.run_dir / img_paths[-1])
                if init_paths[-1]:
                    save_png(torch.from_numpy(init[i]), self.run_dir / init_paths[-1])
        keep = ("subject", "variant", "item", "eeg_item", "stem", "label", "class_name", "sample", "seed", "gt")
        out = {k: batch[k] for k in keep}
        out.update(judge_gt_top1=true.numpy().astype(np.int64), judge_top1=probs.argmax(1).numpy().astype(np.int64),
                   acc_hit=hits, acc_n=np.full(B, n_eff, dtype=np.int64), ssim=ss.numpy(),
                   probs=probs.numpy().astype(np.float32), image=np.asarray(img_paths, dtype=object),
                   saliency=np.asarray(init_paths, dtype=object))
        return out


def summarize(df, k: int, is_splits: int):
    """Per (subject, variant) and pooled (subject 'all') rows; see the module docstring. ``df``: pandas."""
    import pandas as pd

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
