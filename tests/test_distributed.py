"""Ray Train: DDP is real (2 workers x b == 1 worker x 2b), and a killed worker resumes from its checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from neuroimagen.config import load_config

pytestmark = pytest.mark.slow


def _twin_sets(twin) -> list[str]:
    return [f"data.eeg={twin / 'eeg_5_95_std.pth'}", f"data.splits={twin / 'block_splits_by_image_all.pth'}",
            f"data.images={twin / 'images'}", "train.backend=ray", "train.progress=false", "train.threads_per_worker=1"]


def _final_checkpoint(result) -> dict:
    from neuroimagen.training.checkpoint import load_checkpoint

    with result.checkpoint.as_directory() as d:
        return load_checkpoint(d)


def test_ddp_two_workers_equal_one_worker_with_double_batch(ray_session, twin, tmp_path):
    """One optimiser step: 2 workers x batch b must give the parameters of 1 worker x batch 2b."""
    from neuroimagen.data.datasets import load_splits
    from neuroimagen.distributed.train import trainer_for
    from neuroimagen.stages.encoder import build_from_spec
    from neuroimagen.runs.training import stage_inputs

    base = _twin_sets(twin) + [
        "stages.semantic.encoder=lstm", "stages.semantic.width=16", "stages.semantic.embed_dim=16",
        "stages.semantic.hidden=16", "stages.semantic.dropout=0.0", "stages.semantic.init_from_encoder=false",
        "stages.semantic.epochs=1", "stages.semantic.lr=0.01",
    ]
    n_train = len(load_splits(load_config(None, base).data, image_mode="none")["train"])
    b = n_train // 4  # one global batch per epoch either way (the rest is dropped)
    ckpts = {}
    for workers, batch in ((1, 2 * b), (2, b)):
        cfg = load_config(None, base + [f"train.num_workers={workers}", f"stages.semantic.batch_size={batch}"])
        run = tmp_path / f"w{workers}"
        run.mkdir()
        inputs = stage_inputs("semantic", cfg, run, {"stages": {}})
        ckpts[workers] = _final_checkpoint(trainer_for("semantic", cfg, inputs, run).fit())
    one, two = ckpts[1]["modules"]["regressor"], ckpts[2]["modules"]["regressor"]
    assert ckpts[1]["meta"]["world_size"] == 1 and ckpts[2]["meta"]["world_size"] == 2
    for k, v in one.items():
        assert torch.allclose(v, two[k], atol=1e-6, rtol=1e-5), k
    # the step really moved the weights: compare with the seeded initial model
    torch.manual_seed(0 + 3)
    init = build_from_spec(ckpts[1]["meta"]["specs"]["regressor"]).state_dict()
    moved = [k for k in init if k.endswith("weight") and not torch.allclose(init[k], one[k], atol=1e-5)]
    assert len(moved) >= 3, moved


def test_killed_worker_resumes_from_its_last_checkpoint(ray_session, twin, tmp_path):
    """Rank 0 SIGKILLed mid-epoch: the group restarts from the last checkpoint and ends exactly where an
    uninterrupted run with the same seed ends (same history, same final validation metrics)."""
    from neuroimagen.backends import train

    base = _twin_sets(twin) + [
        "stages.encoder.epochs=3", "stages.encoder.embed_dim=16", "stages.encoder.classes_per_batch=3",
        "stages.encoder.samples_per_class=3", "train.max_failures=1",
    ]
    results = train(load_config(None, base + ["train.fault_injection_epoch=1"]), tmp_path / "run", ["encoder"],
                    log=lambda m: None)
    m = results["encoder"]
    # the rank-0 worker was SIGKILLed during epoch 1; the group restarted and resumed after epoch 0
    assert (tmp_path / "run" / "ray" / "encoder-fault-injected").is_file()
    assert m["resumed_at_epochs"] == [0]
    history = json.loads((tmp_path / "run" / "encoder" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert (tmp_path / "run" / "encoder" / "model" / "encoder.pt").is_file()
    # TensorBoard: rank 0's events before the kill and the restarted group's after it hold every epoch once
    from neuroimagen.training.tracking import read_events

    tracked = read_events(tmp_path / "run" / "tensorboard" / "encoder")["scalars"]
    assert [s for s, _ in tracked["train/triplet"]] == [1, 2, 3]
    assert [v for _, v in tracked["train/triplet"]] == pytest.approx([h["train_triplet"] for h in history], rel=1e-6)

    ref = train(load_config(None, base), tmp_path / "ref", ["encoder"], log=lambda m: None)["encoder"]
    assert ref["resumed_at_epochs"] == [] and not (tmp_path / "ref" / "ray" / "encoder-fault-injected").exists()
    ref_history = json.loads((tmp_path / "ref" / "encoder" / "history.json").read_text())
    assert len(history) == len(ref_history)
    for h, r in zip(history, ref_history):  # every epoch's training losses and validation metrics
        assert set(h) == set(r)
        assert {k: v for k, v in h.items() if k != "epoch_seconds"} == pytest.approx(
            {k: v for k, v in r.items() if k != "epoch_seconds"}, abs=1e-6), h["epoch"]
    val = sorted(k for k in ref if k.startswith("val_"))
    assert val and {k: m[k] for k in val} == pytest.approx({k: ref[k] for k in val}, abs=1e-6)
    assert m["best_epoch"] == ref["best_epoch"]
    a = torch.load(tmp_path / "run" / "encoder" / "model" / "encoder.pt", weights_only=True)
    b = torch.load(tmp_path / "ref" / "encoder" / "model" / "encoder.pt", weights_only=True)
    for k, v in b.items():
        assert torch.allclose(a[k], v, atol=1e-6), k  # the exported best weights are the same too
