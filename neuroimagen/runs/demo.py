"""``neuroimagen demo``: the embedded default end to end, on the CPU, with nothing to download.

It synthesises the twin, inspects it, runs the band-power linear probe (with a label-shuffled
control), trains stages 1-3 (on Ray Train unless ``--set train.backend=local``), trains the tiny latent
diffusion model and the judge classifier, reconstructs and scores every subject x variant (Ray Data unless
``--set eval.backend=local``) and writes ``report/report.md``. ``OUT`` is an ordinary run directory:
``neuroimagen train/reconstruct/evaluate/report`` work on it, and re-running them resumes.

``--dataset things-eeg`` does the same on a THINGS-EEG2 twin (the release's structure scaled down: training
concepts with several images and repetitions, unseen test concepts of one image with many repetitions, averaged
by the reader), where the test concepts are zero-shot: N-way ACC is withheld with its reason, the probe is scored
on the validation images (of training concepts), and the zero-shot retrieval is run within subject and
leave-one-subject-out (``neuroimagen.runs.loso``: one fold per subject, ``OUT/loso/sub-XX``), the report showing
both side by side.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from neuroimagen.atomic import atomic_path, write_text
from neuroimagen.config import Config, load_config, override, write_config
from neuroimagen.data.datasets import load_image, load_splits
from neuroimagen.data.inspection import inspect_dataset, render_report
from neuroimagen.data.synthetic import TWIN_FAMILY, synthesize
from neuroimagen.errors import ConfigError
from neuroimagen.logs import get_logger
from neuroimagen.probe import probe_datasets, sampling_rate
from neuroimagen.rundir import start_fresh
from neuroimagen.runs.evaluation import RunRows, evaluate, reconstruct
from neuroimagen.runs.loso import RETRIEVAL as LOSO_RETRIEVAL
from neuroimagen.runs.loso import run_loso
from neuroimagen.runs.reports import summary_table, with_embedding, write_report
from neuroimagen.runs.retrieval import semantic_retrieval
from neuroimagen.runs.training import FitStage, train

_log = get_logger(__name__)

# Presets (dotted overrides applied before the user's --set): small twin, tiny models, short schedules.
_COMMON = ["data.image_size=32", "synth.image_size=32", "stages.encoder.embed_dim=32",
           "stages.saliency.resolution=32", "stages.saliency.z_dim=32", "stages.saliency.g_width=16",
           "stages.saliency.d_width=16", "stages.saliency.batch_size=16", "stages.semantic.embed_dim=32",
           "stages.semantic.hidden=64"]
# train.threads_per_worker stays 0: all cores in-process, one thread per 1-CPU Ray worker (two threads per Ray
# worker were measured 1.2-1.5x slower per epoch than one on 2 cores: bench/RESULTS.md)
QUICK = _COMMON + ["synth.classes=6", "synth.images_per_class=20", "synth.subjects=2", "synth.channels=16",
                   # ChannelNet: TSConv's temporal filter bank loses narrow-band power (twin family, README); lr 1e-3:
                   # 10 encoder-only epochs on the four twins reached val k-NN .92/.81/.94/.91 (best epoch >= 8) vs
                   # .88/.71/.88/.96 at 5e-4
                   "stages.encoder.name=channelnet", "stages.encoder.lr=1e-3", "stages.encoder.epochs=10",
                   "stages.saliency.epochs=40", "stages.semantic.epochs=30",
                   # a VAE of 100 steps blurs thin patterns (glyphs) past recognition, the oracle included
                   "ldm.unet_channels=[16,32]", "ldm.vae_steps=400", "ldm.unet_steps=400", "ldm.num_inference_steps=10",
                   "eval.judge_steps=200", "eval.batch_size=32",
                   # In-process backends: Ray Train's fixed start-up (~25 s per stage here) alone would take the
                   # quick demo past 3 minutes; the default demo, `train`, `reconstruct` and the jobs use Ray.
                   "train.backend=local", "eval.backend=local"]
FULL = _COMMON + ["synth.classes=8", "synth.images_per_class=24", "synth.subjects=3", "synth.channels=32",
                  "stages.encoder.epochs=15", "stages.saliency.epochs=30", "stages.semantic.epochs=25",
                  "ldm.unet_channels=[16,32]", "ldm.vae_steps=150", "ldm.unet_steps=600", "ldm.num_inference_steps=15",
                  "eval.batch_size=32"]

# ``--dataset things-eeg``: the THINGS-EEG2 layout (17 x 100, the preprocessed release's), scaled down. The training
# concepts show every shape and colour of the twin, so each test concept is an unseen pair of seen parts.
THINGS = ["data.format=things-eeg", "synth.format=things-eeg", "synth.channels=17", "synth.layout=17x100",
          "synth.images_per_class=10", "synth.train_repetitions=2",
          # the sibling method's contrastive EEG -> CLIP-image stage, scored by the zero-shot retrieval (NICE / ATM)
          "stages.clip_image.enabled=true"]
# 20 training concepts: each shape and colour in several pairs, so a decoder can tell the parts apart (with 8, each
# shape was seen in one pair only and clip_image's 8-way zero-shot top-1 sat at chance, 6 % vs 12.5 %; with 20: 50 %)
THINGS_QUICK = THINGS + ["synth.classes=20", "synth.test_classes=8", "synth.test_repetitions=8"]
THINGS_FULL = THINGS + ["synth.classes=24", "synth.test_classes=16", "synth.test_repetitions=20"]  # all 40 looks
DATASETS = ("eeg-imagenet", "things-eeg")


def demo_overrides(quick: bool, seed: int, member: Optional[str] = None, user_overrides=(),
                   dataset: str = "eeg-imagenet") -> list[str]:
    """The dotted overrides of a demo: the preset (QUICK or FULL, then THINGS_QUICK / THINGS_FULL for
    ``dataset`` things-eeg), the twin's seed, a twin-family member's settings
    (``neuroimagen.data.synthetic.TWIN_FAMILY``: its EEG code, images, sizes and seed), then the user's ``--set``
    (which always wins). An unknown member or dataset is a ConfigError naming the known ones."""
    if member is not None and member not in TWIN_FAMILY:
        raise ConfigError(f"demo --member: unknown member '{member}'; expected one of {', '.join(TWIN_FAMILY)}")
    if dataset not in DATASETS:
        raise ConfigError(f"demo --dataset: unknown dataset '{dataset}'; expected one of {', '.join(DATASETS)}")
    family = [f"synth.{k}={json.dumps(v)}" for k, v in TWIN_FAMILY.get(member, {}).items()]
    things = (THINGS_QUICK if quick else THINGS_FULL) if dataset == "things-eeg" else []
    return (QUICK if quick else FULL) + things + [f"synth.seed={seed}"] + family + list(user_overrides)


def _step(i: int, n: int, text: str) -> float:
    _log.info(f"[{i}/{n}] {text}")
    return time.perf_counter()


def stimulus_grid(dataset, path: Path, per_class: int = 4) -> Path:
    """PNG grid: one row per class, ``per_class`` training images each, labelled with the class name."""
    rec = dataset.recording
    labels = dataset.labels.numpy()
    classes = sorted(set(labels.tolist()))
    fig = Figure(figsize=(1.3 * per_class, 1.3 * len(classes)))
    axes = fig.subplots(len(classes), per_class, squeeze=False)
    for r, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        for k in range(per_class):
            ax = axes[r][k]
            ax.axis("off")
            if k < len(idx):
                j = int(dataset.indices[idx[k]])
                ax.imshow(load_image(rec.image_paths[j], 64).permute(1, 2, 0).numpy())
        axes[r][0].set_title(rec.class_names[c], fontsize=7, loc="left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def run_demo(cfg: Config, out: str, quick: bool = False, overwrite: bool = False, user_overrides=(),
             fit: Optional[FitStage] = None, execute: Optional[RunRows] = None, member: Optional[str] = None,
             dataset: str = "eeg-imagenet") -> dict:
    """Run every implemented step on a fresh twin under ``out``; returns the headline numbers, the report's path
    and ``lines``: what to show a person at the end (the summary table, the probe, where to look).

    ``fit`` / ``execute``: how a stage is fitted and how rows are generated and scored
    (``neuroimagen.backends.fit_stage`` / ``run_rows``; default: in-process, which the ``--quick`` preset's
    ``local`` backends need).

    ``out`` must be new or empty; with ``overwrite`` it may also be a run directory neuroimagen wrote,
    whose contents are removed first (any other folder is an ``OutputError`` and is left untouched).

    The preset (QUICK or FULL) is applied to ``cfg``, then a twin-family ``member``'s settings (the twin is that
    member: ``neuroimagen demo --quick --member NAME``), then ``user_overrides`` again, so a user's ``--set``
    always wins (:func:`demo_overrides`). ``dataset`` things-eeg: the THINGS-EEG2 twin and the leave-one-subject-out
    folds (module docstring).
    """
    overrides = demo_overrides(quick, cfg.seed, member, user_overrides, dataset)  # before anything is removed
    things = dataset == "things-eeg"
    # a fresh run (old checkpoints must not be resumed); --overwrite empties only a run neuroimagen wrote
    out_dir = start_fresh(out, "run", "neuroimagen demo", overwrite=overwrite)
    t_start = time.perf_counter()
    n = 9 if things else 8
    cfg = override(cfg, overrides)
    synth_cfg = cfg.synth
    _step(1, n, f"synthesising the twin ({synth_cfg.classes} classes x {synth_cfg.images_per_class} images, "
                f"{synth_cfg.subjects} subjects, {synth_cfg.channels} channels)")
    synthesize(out_dir / "twin", synth_cfg)  # out_dir was just emptied
    twin_cfg = load_config(out_dir / "twin" / "config.yaml")
    run_cfg = dataclasses.replace(cfg, data=twin_cfg.data, synth=synth_cfg)
    write_config(run_cfg, out_dir)

    _step(2, n, "inspecting the twin")
    report = inspect_dataset(run_cfg.data.eeg, run_cfg.data.format, run_cfg.data.splits, run_cfg.data.images, run_cfg.data)
    write_text(out_dir / "inspect.json", json.dumps(report, indent=2))

    # a class probe cannot name unseen concepts: on THINGS it is scored on the validation images only
    held_out = ("val",) if things else ("val", "test")
    _step(3, n, f"band-power linear probe (train -> {', '.join(held_out)}; label-shuffled control)")
    splits = load_splits(run_cfg.data, image_mode="path")
    sfreq = sampling_rate(splits["train"].recording)
    probe = {}
    for held in held_out:
        probe[held] = probe_datasets(splits["train"], splits[held], sfreq, seed=cfg.seed).as_dict()
        probe[f"{held}_shuffled"] = probe_datasets(splits["train"], splits[held], sfreq, shuffle_labels=True,
                                                   seed=cfg.seed).as_dict()
    write_text(out_dir / "probe.json", json.dumps(probe, indent=2))

    _step(4, n, f"training stages 1-3 ({run_cfg.train.backend} backend)")
    stages = train(run_cfg, out_dir, fit=fit)

    _step(5, n, "stage 4: tiny latent diffusion model and judge classifier (trained on the training images)")
    _step(6, n, f"reconstructing and scoring {len(run_cfg.eval.variants)} variants x {synth_cfg.subjects} subjects "
                f"({run_cfg.eval.backend} backend)")
    rec_info = reconstruct(run_cfg, out_dir, execute=execute)
    _step(7, n, "reducing the scores (ACC, IS, SSIM and the field's suite per subject and variant; retrieval)")
    summary = evaluate(out_dir)
    if "semantic" in stages or "clip_image" in stages:
        semantic_retrieval(run_cfg, out_dir)
    if things:
        # the folds reconstruct the within run's variants (a narrower list would narrow the within run's too)
        variants = rec_info["state"]["variants"]
        _step(8, n, f"leave-one-subject-out: one fold per subject (stages 1-3, {len(variants)} variants, retrieval)")
        run_loso(run_cfg, out_dir, variants=variants, fit=fit, execute=execute)
    _step(n, n, "writing the report")
    stimulus_grid(splits["train"], out_dir / "stimuli.png")
    rows = "\n".join(
        f"| {k} | {v['accuracy']:.3f} | {v['chance']:.3f} | {v['n_train']} | {v['n_test']} |" for k, v in probe.items()
    )
    ref = {"encoder": ("val_knn_acc", "chance"), "saliency": ("val_ssim", "baseline_mean_image_ssim"),
           "semantic": ("val_nearest_class_acc", "chance"), "semantic_image": ("val_nearest_class_acc", "chance"),
           "clip_image": ("val_top1", "chance")}
    stage_rows = "\n".join(
        f"| {name} | {ref[name][0]} | {m[ref[name][0]]:.3f} | {m['untrained'].get(ref[name][0], float('nan')):.3f} | "
        f"{m[ref[name][1]]:.3f} | {m['best_epoch'] + 1}/{m['epochs']} |" for name, m in stages.items())
    protocols = "\n".join(f"- {name}: {m['protocol']}" for name, m in stages.items())
    command = (f"neuroimagen demo{' --dataset things-eeg' if things else ''}{' --quick' if quick else ''}"
               f"{f' --member {member}' if member else ''} --out {out}")
    md = f"""## Demo: how this run was made

Embedded default: the synthetic twin{f' (family member {member})' if member else ''} (seed {synth_cfg.seed}), CPU, tiny models trained here. Everything in this
report is regenerated by `{command}`; reconstruction took
{rec_info['seconds']:.0f} s for {rec_info['rows']} images.

## Data

{_data_text(run_cfg)}

```
{render_report(report)}
```

![stimuli](../stimuli.png)

## Band-power linear probe

Protocol: log power per channel in 8 bands (4-100 Hz, Hann-windowed periodogram over the window),
standardised, L2 logistic regression (C=0.1) fitted on the train split; top-1 accuracy on the
held-out split{' (THINGS: the validation images, of training concepts; the test concepts are unseen)' if things else ''}; chance = 1/{synth_cfg.classes}. `*_shuffled`: the same probe fitted on
label-permuted training data (must sit near chance; a high value would mean leakage).

| held-out split | accuracy | chance | n train | n held out |
|---|---|---|---|---|
{rows}

## Stages 1-3 (validation split; model selection on validation only)

| stage | metric | trained | untrained | chance / baseline | best epoch |
|---|---|---|---|---|---|
{stage_rows}

Protocols:
{protocols}

![encoder](../encoder/curves.png)
![saliency](../saliency/curves.png)
![semantic](../semantic/curves.png)
![semantic_image](../semantic_image/curves.png)
"""
    report_path = write_report(out_dir, title="neuroimagen demo report", extra_sections=[md])
    elapsed = time.perf_counter() - t_start
    held = held_out[-1]
    lines = [summary_table(out_dir),
             *(_retrieval_lines(out_dir) if things else []),
             f"done in {elapsed:.0f} s. Probe {held} accuracy {probe[held]['accuracy']:.2f} "
             f"(chance {probe[held]['chance']:.2f}, shuffled control {probe[f'{held}_shuffled']['accuracy']:.2f}).",
             f"Look at: {report_path} (results: {out_dir / 'results'}, data: {out_dir / 'twin'}, "
             f"config: {out_dir / 'config.yaml'})"]
    return {"probe": probe, "stages": stages, "summary": summary, "seconds": elapsed, "report": report_path,
            "lines": lines}


def _data_text(cfg: Config) -> str:
    """The report's data paragraph: the layout, its sizes and how the evaluation split relates to training."""
    d, sy = cfg.data, cfg.synth
    if d.format == "things-eeg":
        C, T = sy.shape()
        return (f"THINGS-EEG2 layout (`sub-XX/preprocessed_eeg_{{training,test}}.npy`, `image_set/`), {C} channels x "
                f"{T} samples; {sy.classes} training concepts x {sy.images_per_class} images x {sy.train_repetitions} "
                f"repetitions (one image per concept held out for validation), {sy.test_classes} test concepts x 1 "
                f"image x {sy.test_repetitions} repetitions, averaged by the reader (`data.test_repetitions: "
                f"{d.test_repetitions}`); {sy.subjects} subjects. The test concepts are disjoint from the training "
                "ones (zero-shot, as the release): the gallery of the retrieval is every test concept.")
    return (f"EEG-ImageNet layout, file `{Path(d.eeg).name}`, split file `{Path(d.splits).name}` split {d.split_num};\n"
            f"{sy.classes} classes, {sy.subjects} subjects, {sy.channels} channels; window\n"
            f"{list(d.resolved_window())}, length filter as in `inspect.json`.")


def _retrieval_lines(out_dir: Path) -> list[str]:
    """The pooled zero-shot retrieval at the gallery size, within subject and LOSO, beside chance: one line per
    scored embedding (stage 3's caption embedding; clip_image's)."""
    path = out_dir / LOSO_RETRIEVAL
    if not path.is_file():
        return []
    t = with_embedding(pd.read_csv(path, dtype={"subject": str, "control": str, "embedding": str}))
    t = t[(t["subject"] == "all") & (t["control"] == "eeg")]
    lines = []
    for emb, e in t.groupby("embedding", sort=False):
        k = int(e["k"].max())
        cells = []
        for p in ("within", "loso"):
            r = e[(e["protocol"] == p) & (e["k"] == k)].set_index("top")
            if len(r):
                cells.append(f"{p} " + ", ".join(f"top-{int(m)} {100 * r.loc[m, 'accuracy']:.1f} % (chance "
                                                 f"{100 * r.loc[m, 'chance']:.1f} %)" for m in sorted(r.index)))
        lines.append(f"Zero-shot retrieval ({emb} embedding), {k}-way (every test concept): " + "; ".join(cells) + ".")
    return lines
