"""What the field's suite was computed with, and one protocol card per number of ``summary.csv``.

:func:`suite_record` is written by ``reconstruct`` into ``results/state.json`` (the suite's networks, their
weights' sha256, which metric each feature feeds, the FID network); :func:`suite_protocol` turns it into
``protocol.json``'s ``suite`` section and :func:`metric_cards` into ``protocol.json``'s ``cards``: for every
metric column a flat description of how that number was made (data, split, trials, network and weights hash,
resolution, convention, repetition averaging, interval, seed), which ``neuroimagen compare`` checks before it
calls two numbers comparable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

from neuroimagen.config import Config
from neuroimagen.metrics.pixcorr import MINDEYE_BASE_RESOLUTION, PIXCORR_RESOLUTION
from neuroimagen.models.classifier import file_sha256
from neuroimagen.reconstruction.factory import suite_layout
from neuroimagen.reconstruction.rows import PURPOSES

# feature key -> (eval.suite key, network, node, input resolution, MindEye's name of the number)
FEATURES = {
    "alexnet2": ("alexnet", "torchvision alexnet", "features.4", "256 px", "AlexNet(2)"),
    "alexnet5": ("alexnet", "torchvision alexnet", "features.11", "256 px", "AlexNet(5)"),
    "inception": ("inception", "torchvision inception_v3", "avgpool", "342 px", "Inception"),
    "clip": ("clip", "CLIP ViT-L/14 vision (transformers)", "image_embeds", "224 px (the model's image_size)", "CLIP"),
    "effnet": ("effnet", "torchvision efficientnet_b1", "avgpool", "255 px", "EffNet-B"),
    "swav": ("swav", "SwAV resnet50", "avgpool", "224 px", "SwAV"),
    "judge": ("judge", "the judge CNN", "global average pool of the last conv block", "the judge's input size",
              "two-way (judge CNN features)"),
}
SAMPLES = "every sample of a trial scored on its own; the group's number is the mean over all samples of all trials"


def _hash_path(path: str) -> str:
    """sha256 of a weights file, or of a folder's files (names and bytes, sorted): a folder is one model."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(str(f.relative_to(p)).encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def suite_record(cfg: Config, classifier: dict) -> dict:
    """The suite's layout (``reconstruction.factory.suite_layout``) with every network's path and weights hash,
    as ``state.json`` keeps it; ``classifier`` is the classifier's description (its identity labels the judge's
    features)."""
    judge = classifier.get("kind") == "judge"
    layout = suite_layout(cfg, judge)
    nets = {key: {"path": str(path), "sha256": _hash_path(str(path))} for key, path in layout["networks"].items()}
    if judge and ("judge" in layout["twoway"] or layout["fid"] == "judge"):
        nets["judge"] = {"identity": classifier.get("identity"), "input_size": classifier.get("input_size")}
    sc = cfg.eval.suite
    return {**layout, "networks": nets,
            "statistics": {"n_boot": sc.bootstrap, "n_boot_whole": sc.bootstrap_whole_set, "level": sc.ci_level,
                           "kid_subsets": sc.kid_subsets, "kid_subset_size": sc.kid_subset_size,
                           "n_perm": sc.permutations, "comparisons": list(sc.comparisons)}}


def _network(record: dict, key: str) -> dict:
    net_key, name, node, res, published = FEATURES[key]
    net = record["networks"].get(net_key, {})
    if key == "judge":
        return {"network": f"{name} {net.get('identity')} (trained on this dataset's training images; not a "
                           f"published network: comparable only within this project)",
                "node": node, "resolution": f"{net.get('input_size')} px", "published_name": published}
    return {"network": name, "weights_sha256": net.get("sha256"), "node": node, "resolution": res,
            "preprocessing": f"clamp [0, 1], resize {MINDEYE_BASE_RESOLUTION} x {MINDEYE_BASE_RESOLUTION}, then the "
                             f"network's resize (bilinear, no antialiasing) and normalisation (MindEye)",
            "published_name": published}


def suite_protocol(state: dict) -> dict:
    """``protocol.json``'s ``suite`` section from ``state.json`` (empty for a run scored without the suite)."""
    record = state.get("suite") or {}
    if not record:
        return {}
    seed = state["seed"]
    st = record["statistics"]
    fid = record.get("fid")
    return {
        "gallery": "per subject: the distinct ground-truth images of its evaluated trials; two-way identification "
                   "compares each generation's feature correlation with its own ground truth against every other "
                   "gallery image (MindEye's two_way_identification, ties count as failures, chance 0.5)",
        "two_way": {k: _network(record, k) for k in record["twoway"]},
        "distance": {k: _network(record, k) for k in record["distance"]},
        "fid": ({**_network(record, fid), "reference": "the ground truth of each trial of the group",
                 "kid": f"unbiased MMD^2, cubic polynomial kernel, {st['kid_subsets']} subsets of "
                        f"min({st['kid_subset_size']}, N) rows (torch-fidelity's estimator)",
                 "note": ("Inception-v3 avgpool features with torchvision's weights, not the TF-FID Inception: "
                          "not comparable with published FID" if fid == "inception" else
                          "judge CNN features: comparable only within this project")} if fid else None),
        "pixcorr": f"MindEye: clamp, resize {MINDEYE_BASE_RESOLUTION} x {MINDEYE_BASE_RESOLUTION} then short edge "
                   f"{PIXCORR_RESOLUTION} (bilinear, no antialiasing), Pearson r of all pixels per pair, float64",
        "chance": {"pixcorr_chance, ssim_chance": "each generation against another trial's ground truth of its "
                                                  f"subject's gallery (seed_mismatch = SeedSequence(entropy={seed}, "
                                                  f"spawn_key=({PURPOSES['mismatch']}, trial)), the same for every "
                                                  "sample and variant)",
                   "dist_<net>_chance": "mean correlation distance of each generation to the other gallery images",
                   "twoway_<net>_chance": "0.5 by definition", "acc_chance": "k / N"},
        "intervals": f"percentile bootstrap, level {st['level']}, resampling test trials with replacement (all "
                     f"samples of a drawn trial together; pooled rows: (subject, trial)), torch.Generator seeded "
                     f"{seed}: {st['n_boot']} replicates for per-image means, {st['n_boot_whole']} for IS and FID "
                     f"(recomputed per replicate); KID reports its std over subsets",
        "tests": f"two-sided paired sign-flip permutation test of mean(a - b) over trials (per-trial means over "
                 f"samples), {st['n_perm']} random sign flips or exact enumeration, seed {seed}; pairs "
                 f"{', '.join(st['comparisons'])}",
        "repetition": SAMPLES,
    }


def _base(column: str) -> str:
    """The metric a column belongs to: ``pixcorr_chance_lo`` -> ``pixcorr``."""
    for suffix in ("_lo", "_hi", "_std"):
        if column.endswith(suffix):
            column = column[: -len(suffix)]
            break
    return column[: -len("_chance")] if column.endswith("_chance") else column


def metric_cards(protocol: dict, state: dict, columns: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One card per metric column of ``summary.csv`` (``_lo`` / ``_hi`` / ``_std`` / ``_chance`` share their
    metric's card plus what they are)."""
    data = protocol["data"]
    common = {"data": {"dataset": data.get("dataset"), "split": data.get("split"), "subjects": data.get("subjects"),
                       "n_trials": data.get("n_trials")},
              "ldm": {k: protocol["ldm"].get(k) for k in ("identity", "strength", "guidance_scale",
                                                          "num_inference_steps", "samples_per_eeg", "resolution")},
              "seed": state["seed"], "seeding": state.get("seeding")}
    record = state.get("suite") or {}
    st = record.get("statistics", {})
    ci = {"level": st.get("level"), "replicates": st.get("n_boot"), "unit": "test trial"} if st else None
    clf = {k: protocol["classifier"].get(k) for k in ("identity", "kind", "label_space", "num_classes")}
    suite = protocol.get("suite") or {}
    base_cards: dict[str, dict] = {
        "acc": {"metric": "N-way top-k accuracy", "classifier": clf, "protocol": {k: protocol["acc"].get(k) for k in
                                                                                  ("n", "k", "trials", "n_eff")},
                "repetition": SAMPLES},
        "acc_max": {"metric": "N-way top-k accuracy, best sample per trial", "classifier": clf,
                    "protocol": {k: protocol["acc"].get(k) for k in ("n", "k", "trials", "n_eff")},
                    "repetition": "max over the samples of a trial, mean over trials"},
        "judge_gt_acc": {"metric": "classifier top-1 on the ground-truth images", "classifier": clf},
        "ssim": {"metric": "SSIM", **protocol["ssim"], "repetition": SAMPLES},
        "pixcorr": {"metric": "PixCorr", "protocol": suite.get("pixcorr"), "repetition": SAMPLES},
    }
    for col, lab in (protocol.get("is") or {}).get("networks", {}).items():
        base_cards[col] = {"metric": lab.get("label"), "network": lab.get("network"),
                           "splits": protocol["is"].get("split_rule"), "permutation": protocol["is"].get("permutation")}
    for k, net in (suite.get("two_way") or {}).items():
        base_cards[f"twoway_{k}"] = {"metric": "two-way identification", **net, "gallery": suite.get("gallery"),
                                     "repetition": SAMPLES}
    for k, net in (suite.get("distance") or {}).items():
        base_cards[f"dist_{k}"] = {"metric": "correlation distance", **net, "repetition": SAMPLES}
    if protocol.get("flags"):
        base_cards["flags"] = {"metric": "variant flags (text, empty when none)", "rule": protocol["flags"].get("rule"),
                               "thresholds": protocol["flags"].get("thresholds")}
    if suite.get("fid"):
        base_cards["fid"] = {"metric": "FID", **suite["fid"]}
        base_cards["kid"] = {"metric": "KID", **suite["fid"]}
    cards = {}
    for col in columns:
        base = _base(col)
        if base not in base_cards:
            continue
        card = {**common, **base_cards[base]}
        if col.endswith(("_lo", "_hi")) and ci:
            card["interval"] = {**ci, "bound": "lower" if col.endswith("_lo") else "upper"}
        if col.endswith(("_chance", "_chance_lo", "_chance_hi")):
            card["baseline"] = (suite.get("chance") or {}).get(
                {"pixcorr": "pixcorr_chance, ssim_chance", "ssim": "pixcorr_chance, ssim_chance"}.get(
                    base, "dist_<net>_chance" if base.startswith("dist_") else "twoway_<net>_chance" if
                    base.startswith("twoway_") else "acc_chance"))
        cards[col] = card
    return cards
