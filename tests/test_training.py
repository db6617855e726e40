"""Training without Ray: samplers, checkpoints, resume determinism, and each stage beating its untrained self."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from neuroimagen.config import load_config
from neuroimagen.errors import ConfigError
from neuroimagen.training.checkpoint import load_checkpoint, load_model_dir
from neuroimagen.training.samplers import BalancedBatchSampler, GlobalBatchSampler

# A small but learnable twin and short schedules: the whole run takes a couple of minutes on 2 cores.
TRAIN_SETS = [
    "train.backend=local", "train.progress=false", "train.threads_per_worker=2",
    "synth.classes=6", "synth.images_per_class=20", "synth.subjects=2", "synth.channels=16", "synth.image_size=32",
    "data.image_size=32",
    "stages.encoder.epochs=10", "stages.encoder.embed_dim=32",
    "stages.saliency.epochs=40", "stages.saliency.resolution=32", "stages.saliency.g_width=16",
    "stages.saliency.d_width=16", "stages.saliency.z_dim=32", "stages.saliency.batch_size=16",
    "stages.semantic.epochs=15", "stages.semantic.embed_dim=32", "stages.semantic.hidden=64",
]


# ----------------------------------------------------------------------------------------------
# Samplers


def test_global_batches_do_not_depend_on_the_number_of_workers():
    one = list(GlobalBatchSampler(50, 8, seed=3, rank=0, world_size=1))
    two = [list(GlobalBatchSampler(50, 4, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(one) == 6 and len(two[0]) == len(two[1]) == 6
    for s in range(6):
        assert sorted(two[0][s] + two[1][s]) == sorted(one[s])
    sampler = GlobalBatchSampler(50, 8, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) != one  # a new permutation each epoch
    sampler.set_epoch(0)
    assert list(sampler) == one  # and the same one again for the same epoch (resume replays it)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        GlobalBatchSampler(5, 4, world_size=2)


def test_balanced_batches_never_repeat_a_trial():
    """A repeated trial is a "positive" at distance 0: a class with fewer than K trials gives all it has, and a
    class queue refilled mid-batch never hands back a trial already in the batch."""
    labels = np.repeat(np.arange(7), [3, 9, 4, 5, 6, 2, 8])
    sizes = np.bincount(labels)
    for K in (3, 4):
        for world in (1, 2):
            shards = [BalancedBatchSampler(labels, classes_per_batch=4 // world, samples_per_class=K, seed=0,
                                           rank=r, world_size=world) for r in range(world)]
            for epoch in range(4):
                for s in shards:
                    s.set_epoch(epoch)
                for parts in zip(*shards):
                    batch = [i for p in parts for i in p]  # the global batch
                    assert len(set(batch)) == len(batch), (K, world, epoch, batch)
                    counts = np.bincount(labels[batch], minlength=7)
                    drawn = np.flatnonzero(counts)
                    assert len(drawn) == 4 and (counts[drawn] == np.minimum(K, sizes[drawn])).all(), counts


def test_balanced_global_batch_does_not_depend_on_the_number_of_workers():
    labels = np.repeat(np.arange(7), [3, 9, 4, 5, 6, 2, 8])
    one = list(BalancedBatchSampler(labels, 4, 3, seed=5, rank=0, world_size=1))
    two = [list(BalancedBatchSampler(labels, 2, 3, seed=5, rank=r, world_size=2)) for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 37 // 12
    for s, batch in enumerate(one):
        assert two[0][s] + two[1][s] == batch  # rank r holds the r-th contiguous slice of the global batch
        assert abs(len(two[0][s]) - len(two[1][s])) <= 1 and not set(two[0][s]) & set(two[1][s])
    # more classes asked for than exist: the global batch holds each class once, on any number of workers
    assert sorted(set(labels[list(BalancedBatchSampler(labels, 8, 2, seed=1))[0]])) == list(range(7))
    with pytest.raises(ValueError, match="as few as 2 samples, too few to give each of 3 workers one"):
        BalancedBatchSampler([0, 1], classes_per_batch=1, samples_per_class=2, world_size=3)


def test_the_triplet_margin_is_measured_on_unit_norm_embeddings_by_default():
    """Scaling the encoder's output layer (the way to meet a margin on raw features) leaves the default triplet
    loss unchanged, while the features handed to stage 2 stay raw unless stages.encoder.l2_normalize."""
    from neuroimagen.losses import triplet_loss
    from neuroimagen.stages.encoder import build_from_spec, encoder_spec

    sc = load_config(None).stages.encoder
    assert sc.triplet_normalize and not sc.l2_normalize and sc.squared and sc.margin == 0.2
    x = torch.randn(6, 8, 440, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    for name in ("lstm", "tsconv"):
        torch.manual_seed(0)
        enc = build_from_spec(encoder_spec(load_config(None, [f"stages.encoder.name={name}"]).stages.encoder, 8, 440)).eval()
        with torch.no_grad():
            emb = enc(x)  # (6, D)
            last = [m for m in enc.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.weight.mul_(10.0)
            last.bias.mul_(10.0)
            inflated = enc(x)
        assert not torch.allclose(inflated, emb), name  # raw features: 10x larger
        args = (sc.margin, "batch_all", sc.squared)
        same = triplet_loss(inflated, y, *args, normalize=sc.triplet_normalize)[0]
        assert float(same) == pytest.approx(float(triplet_loss(emb, y, *args, normalize=sc.triplet_normalize)[0]), abs=1e-5)
    unit = load_config(None, ["stages.encoder.l2_normalize=true"]).stages.encoder
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.allclose(build_from_spec(encoder_spec(unit, 8, 440)).eval()(x).norm(dim=1), torch.ones(6), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# One trained run shared by the stage tests


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from neuroimagen.backends import train

    cfg = load_config(None, TRAIN_SETS)
    out = tmp_path_factory.mktemp("run") / "r"
    results = train(cfg, out, log=lambda m: None)
    return out, results


def _metrics(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "metrics.json").read_text())


@pytest.mark.slow
def test_encoder_beats_chance_and_its_untrained_self(trained_run):
    run, _ = trained_run
    m = _metrics(run, "encoder")
    assert m["chance"] == pytest.approx(1 / 6)
    assert m["val_knn_acc"] >= 2 * m["chance"], m
    assert m["val_knn_acc"] > m["untrained"]["val_knn_acc"] + 0.1, m
    assert "k-NN" in m["protocol"] and m["selected_on"].startswith("val_knn_acc")


@pytest.mark.slow
def test_saliency_beats_the_mean_image_and_its_untrained_self(trained_run):
    run, _ = trained_run
    m = _metrics(run, "saliency")
    assert m["val_ssim"] > m["baseline_mean_image_ssim"], m
    # not SSIM over the untrained G: with its condition standardised (CondNorm) the untrained G draws a near-uniform
    # image as close to the mean image on SSIM (0.355 vs 0.357); pixel correlation is what it cannot fake
    assert m["val_pixcorr"] > m["untrained"]["val_pixcorr"] + 0.1, m
    doc, states = load_model_dir(run / "saliency" / "model")
    assert set(states) == {"generator"} and doc["modules"]["generator"]["kwargs"]["resolution"] == 32
    assert (run / "saliency" / "curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_semantic_beats_chance_and_its_untrained_self(trained_run):
    run, _ = trained_run
    m = _metrics(run, "semantic")
    assert m["val_nearest_class_acc"] >= 2 * m["chance"], m
    assert m["val_mse"] < m["untrained"]["val_mse"], m
    assert m["data"]["init"].startswith("encoder initialised from")
    targets = list((run / "semantic").glob("targets-*.pt"))
    assert len(targets) == 1  # one cache file per run, keyed by text encoder and caption set
    cached = torch.load(targets[0], weights_only=True)
    assert cached["table"].shape[0] == 6 and cached["kind"] == "label"
    # the exported regressor outputs embeddings in the text encoder's space: (B, L, E)
    from neuroimagen.stages.encoder import build_from_spec

    doc, states = load_model_dir(run / "semantic" / "model")
    model = build_from_spec(doc["modules"]["regressor"])
    model.load_state_dict(states["regressor"])
    out = model.eval()(torch.randn(2, 16, 440))
    assert out.shape == (2, *cached["table"].shape[1:])


@pytest.mark.slow
def test_a_run_that_learns_fires_no_guard(trained_run):
    """The guards (tests/test_guards.py) stay quiet on stages that learned: each beats its untrained self, G reads the
    EEG (SSIM well above shuffled EEG), the regressor beats shuffled EEG."""
    run, results = trained_run
    for stage, m in results.items():
        assert m["guards"]["fired"] == [] and m["guards"]["warning"] is None, (stage, m["guards"])
    sal = _metrics(run, "saliency")["guards"]["collapsed"]
    assert sal["condition_gain"] > sal["tolerance"] and sal["spread_conditions"] > 0.1 * sal["spread_z"], sal
    sem = _metrics(run, "semantic")
    assert sem["val_nearest_class_shuffled"] < sem["val_nearest_class_acc"] - 0.2, sem


@pytest.mark.slow
def test_run_directory_records_the_hand_offs(trained_run):
    run, results = trained_run
    record = json.loads((run / "run.json").read_text())
    assert set(record["stages"]) == {"encoder", "saliency", "semantic", "semantic_image"}
    for stage, entry in record["stages"].items():
        assert (run / entry["model"] / "model.json").is_file()
        assert json.loads((run / entry["metrics"]).read_text())["stage"] == stage
    sal = _metrics(run, "saliency")
    assert sal["data"]["encoder"] == str(run / "encoder" / "model")  # explicit path, not "the latest"
    assert load_config(run / "config.yaml").data.eeg == str(run / "twin" / "eeg_5_95_std.pth")
    ckpt = load_checkpoint(sorted((run / "checkpoints" / "encoder").glob("epoch-*"))[-1])
    assert not any(k.startswith("module.") for k in ckpt["modules"]["encoder"])  # unwrapped keys


# ----------------------------------------------------------------------------------------------
# Resume


def test_resumed_stage_equals_an_uninterrupted_one(tmp_path, twin):
    """Stop after 2 of 4 epochs, re-run: the resumed run ends exactly where a straight run ends."""
    from neuroimagen.backends import train

    sets = ["train.backend=local", "train.progress=false", f"data.eeg={twin / 'eeg_5_95_std.pth'}",
            f"data.splits={twin / 'block_splits_by_image_all.pth'}", f"data.images={twin / 'images'}",
            "stages.encoder.embed_dim=16", "stages.encoder.classes_per_batch=3", "stages.encoder.samples_per_class=3"]
    straight = train(load_config(None, sets + ["stages.encoder.epochs=4"]), tmp_path / "a", ["encoder"], log=lambda m: None)
    train(load_config(None, sets + ["stages.encoder.epochs=2"]), tmp_path / "b", ["encoder"], log=lambda m: None)
    resumed = train(load_config(None, sets + ["stages.encoder.epochs=4"]), tmp_path / "b", ["encoder"], log=lambda m: None)
    assert resumed["encoder"]["resumed_at_epochs"] == [1]
    a = json.loads((tmp_path / "a" / "encoder" / "history.json").read_text())
    b = json.loads((tmp_path / "b" / "encoder" / "history.json").read_text())
    assert [h["epoch"] for h in b] == [0, 1, 2, 3]
    for ha, hb in zip(a, b):
        assert ha["train_triplet"] == pytest.approx(hb["train_triplet"], rel=1e-6, abs=1e-7)
        assert ha["val_knn_acc"] == hb["val_knn_acc"]
    assert straight["encoder"]["val_knn_acc"] == resumed["encoder"]["val_knn_acc"]


def test_stage_order_and_missing_dependency(tmp_path, twin):
    from neuroimagen.backends import train
    from neuroimagen.runs.training import resolve_stages

    assert resolve_stages(["semantic", "encoder"]) == ["encoder", "semantic"]
    with pytest.raises(ConfigError, match="unknown stage 'decoder'"):
        resolve_stages(["decoder"])
    sets = ["train.backend=local", f"data.eeg={twin / 'eeg_5_95_std.pth'}",
            f"data.splits={twin / 'block_splits_by_image_all.pth'}", f"data.images={twin / 'images'}"]
    with pytest.raises(ConfigError, match="stage 'saliency' needs a finished 'encoder' stage"):
        train(load_config(None, sets), tmp_path / "r", ["saliency"], log=lambda m: None)


def test_shipped_quick_config_trains_the_twin_by_default():
    cfg = load_config(REPO / "configs" / "quick.yaml")
    assert cfg.data.eeg is None  # the embedded default: the twin is synthesised into the run
    assert cfg.synth.classes >= 2
