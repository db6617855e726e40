"""Stage clip_image: config errors, the symmetric InfoNCE and its temperature, batches of distinct images, training
on a tiny THINGS twin (beats its untrained self on validation retrieval), the retrieval table's clip_image rows,
and the Ray Train path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from neuroimagen.config import load_config
from neuroimagen.errors import ConfigError
from neuroimagen.losses import clip_loss
from neuroimagen.models.clip_image import MAX_LOGIT_SCALE, ClipEEGModel
from neuroimagen.training.samplers import DistinctGroupBatchSampler

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sets, message", [
    (["stages.clip_image.clip_vision=https://example.org/clip"], "stages.clip_image.clip_vision: expected a local folder or 'tiny'"),
    (["stages.clip_image.enabled=true", "stages.clip_image.clip_vision=/no/such/clip"], "/no/such/clip: no such directory"),
    (["stages.clip_image.temperature=0"], "stages.clip_image.temperature: expected float >= 0.01 and <= 1, got 0"),
    (["stages.clip_image.batch_size=1"], "stages.clip_image.batch_size: expected integer >= 2, got 1"),
    (["stages.clip_image.encoder=vit"], "stages.clip_image.encoder: unknown encoder 'vit'; expected one of lstm, channelnet, tsconv"),
    (["stages.clip_image.enable=true"], "stages.clip_image.enable: unknown key (did you mean 'enabled'?)"),
])
def test_config_errors_are_one_line(sets, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_defaults_keep_the_stage_off_and_a_missing_folder_is_fine_while_disabled():
    from neuroimagen.runs.training import default_stages

    cfg = load_config(None, ["stages.clip_image.clip_vision=/no/such/clip"])
    assert cfg.stages.clip_image.enabled is False
    assert default_stages(cfg) == ["encoder", "saliency", "semantic", "semantic_image"]
    assert default_stages(load_config(None, ["stages.clip_image.enabled=true"]))[-1] == "clip_image"


def _brute_force_infonce(e: torch.Tensor, i: torch.Tensor, scale: float) -> float:
    def unit(rows):
        return [[x / math.sqrt(sum(y * y for y in v)) for x in v] for v in rows.double().tolist()]

    e, i = unit(e), unit(i)
    n = len(e)
    s = [[scale * sum(a * b for a, b in zip(e[r], i[c])) for c in range(n)] for r in range(n)]
    eeg_to_image = sum(math.log(sum(math.exp(s[r][c]) for c in range(n))) - s[r][r] for r in range(n)) / n
    image_to_eeg = sum(math.log(sum(math.exp(s[r][c]) for r in range(n))) - s[c][c] for c in range(n)) / n
    return 0.5 * (eeg_to_image + image_to_eeg)


def test_symmetric_infonce_equals_a_brute_force_computation():
    g = torch.Generator().manual_seed(0)
    e, i = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g)
    for scale in (1.0, 14.3, 100.0):
        assert float(clip_loss(e, i, torch.tensor(scale))) == pytest.approx(_brute_force_infonce(e, i, scale), rel=1e-5)
    # perfectly aligned pairs at a large scale: the loss tends to 0; swapped pairs: large
    assert float(clip_loss(i, i, torch.tensor(100.0))) < 1e-3
    assert float(clip_loss(i.roll(1, 0), i, torch.tensor(100.0))) > 10
    with pytest.raises(ValueError, match="must both be"):
        clip_loss(e, i[:, :4], torch.tensor(1.0))


def test_the_temperature_is_learnable_and_clamped_as_clip():
    model = ClipEEGModel(n_chans=4, n_times=32, proj_dim=6, encoder="tsconv", embed_dim=8, width=4, dropout=0.0,
                         temperature=0.07)
    assert float(model.logit_scale.detach().exp()) == pytest.approx(1 / 0.07)
    z, scale = model(torch.randn(5, 4, 32), with_scale=True)
    assert z.shape == (5, 6) and scale.ndim == 0
    clip_loss(z, torch.randn(5, 6), scale).backward()
    assert model.logit_scale.grad is not None and float(model.logit_scale.grad.abs()) > 0
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_scale()
    assert float(model.logit_scale) == pytest.approx(MAX_LOGIT_SCALE) and float(model.logit_scale.exp()) == pytest.approx(100)


@pytest.mark.parametrize("world", [1, 2])
def test_a_global_batch_never_holds_two_rows_of_one_image(world):
    # 30 images, each seen by 1-4 subjects / repetitions: 75 rows
    groups = torch.tensor([g for g in range(30) for _ in range(1 + g % 4)])
    batch = 8 // world
    per_rank = [DistinctGroupBatchSampler(groups, batch, seed=3, rank=r, world_size=world) for r in range(world)]
    one = DistinctGroupBatchSampler(groups, 8, seed=3)
    for epoch in (0, 1):
        for s in per_rank + [one]:
            s.set_epoch(epoch)
        shards = [list(s) for s in per_rank]
        assert all(len(x) == len(one) for x in shards) and len(groups) // 8 - 1 <= len(one) <= len(groups) // 8
        for step, global_batch in enumerate(one):
            assert len(set(groups[global_batch].tolist())) == len(global_batch) == 8  # distinct images
            # world-size invariant: the ranks' shards of step s are the one-worker global batch
            assert sum((x[step] for x in shards), []) == global_batch
        used = [i for b in one for i in b]
        assert len(used) == len(set(used)) >= len(groups) - 16  # no row twice; what is left is the tail


def test_too_few_images_for_a_global_batch_is_one_clear_error():
    with pytest.raises(ValueError, match="3 distinct images cannot fill one global batch of 2 x 2 workers"):
        DistinctGroupBatchSampler(torch.tensor([0, 0, 1, 1, 2]), 2, world_size=2)


def test_the_guard_flags_a_model_that_does_not_beat_shuffled_eeg():
    from neuroimagen.stages.clip_image import ClipImageStage

    data = {"val": {"n": 40}, "val_gallery": 20}
    fired = ClipImageStage.guards(data, {"val_top1": 0.06, "val_top1_shuffled": 0.05})["ignores_eeg"]
    assert fired["fired"] and "not above the shuffled-EEG control" in fired["reason"]
    assert not ClipImageStage.guards(data, {"val_top1": 0.5, "val_top1_shuffled": 0.05})["ignores_eeg"]["fired"]
    assert ClipImageStage.chance(data, {}) == {"chance": 1 / 20, "val_gallery": 20}


def test_ablation_and_every_loso_fold_train_it_when_enabled():
    from neuroimagen.runs.evaluation import stages_to_train
    from neuroimagen.runs.loso import fold_config

    on, off = load_config(None, ["stages.clip_image.enabled=true"]), load_config(None)
    assert "clip_image" in stages_to_train(on, ["L+I"], {}) and "clip_image" not in stages_to_train(off, ["L+I"], {})
    assert stages_to_train(on, ["L+I"], {"encoder": 1, "saliency": 1, "semantic": 1, "clip_image": 1}) == []
    fold = fold_config(on, 2)
    assert fold.data.holdout_subject == 2 and "clip_image" in stages_to_train(fold, ["L+I"], {})


def test_registered_as_a_stage_and_sweepable():
    from neuroimagen.runs.sweeps import STAGE_METRICS, load_space
    from neuroimagen.stages import STAGES, protocol_of

    assert STAGES["clip_image"].select_metric == "val_top1" and STAGE_METRICS["clip_image"]["val_top1"] == "max"
    space, _ = load_space(REPO / "tune_spaces" / "clip_image.yaml")
    assert space.stage == "clip_image" and space.metric == "val_top1" and space.mode == "max"
    assert "validation gallery" in protocol_of(load_config(None), "clip_image")


def twin_config(twin: Path) -> Path:
    return twin / "config.yaml"


def _things_sets(twin: Path, *extra: str) -> list[str]:
    return ["train.backend=local", "train.progress=false", "stages.clip_image.enabled=true",
            "stages.clip_image.encoder=tsconv", "stages.clip_image.width=8", "stages.clip_image.embed_dim=16",
            "stages.clip_image.tiny_dim=32", "stages.clip_image.batch_size=16", "stages.clip_image.lr=1e-3", *extra]


@pytest.mark.slow
def test_trains_on_a_things_twin_beats_its_untrained_self_and_is_retrieved(things_twin, tmp_path):
    from neuroimagen.runs.reports import retrieval_section
    from neuroimagen.runs.retrieval import semantic_retrieval
    from neuroimagen.runs.training import stage_inputs, train
    from neuroimagen.stages import build_stage
    from neuroimagen.training.context import RunContext

    cfg = load_config(twin_config(things_twin), _things_sets(things_twin, "stages.clip_image.epochs=8"))
    run = tmp_path / "run"
    m = train(cfg, run, ["clip_image"], log=lambda m: None)["clip_image"]
    assert m["val_gallery"] == 4 and m["chance"] == pytest.approx(0.25)
    assert m["val_top1"] > m["untrained"]["val_top1"], (m["val_top1"], m["untrained"])
    assert m["val_top1"] > m["val_top1_shuffled"] and not m["guards"]["ignores_eeg"]["fired"]
    assert 0.01 <= m["val_temperature"] <= 1.0 and m["data"]["batches"] == "distinct images per global batch"
    # the stage's own loader: no batch holds two rows of one image
    stage = build_stage("clip_image", cfg, RunContext(), stage_inputs("clip_image", cfg, run, {"stages": {}}))
    stems = stage.inputs["splits"]["train"].stems
    for epoch in (0, 1):
        stage.set_epoch(epoch)
        for b in stage.sampler:
            assert len({stems[i] for i in b}) == len(b)

    table = semantic_retrieval(cfg, run, log=lambda m: None)
    csv = pd.read_csv(run / "results" / "retrieval.csv", dtype={"subject": str})
    assert list(csv.columns[:2]) == ["protocol", "embedding"] and set(csv["protocol"]) == {"within"}
    clip = csv[csv["embedding"] == "clip_image"]
    assert len(clip) == len(table) and set(clip["control"]) == {"eeg", "shuffled"}
    assert set(clip["gallery"]) == {3} and set(clip["k"]) == {2, 3}  # 3 test images, k capped at the gallery
    assert set(clip["subject"]) == {"1", "2", "all"}
    full = clip[(clip["k"] == 3) & (clip["subject"] == "all")]
    assert np.allclose(full["chance"], 1 / 3) and full["accuracy"].between(0, 1).all()
    proto = json.loads((run / "results" / "retrieval.json").read_text())
    assert proto["embeddings"]["clip_image"]["gallery"] == 3 and proto["zero_shot"] is True
    assert "## Retrieval from the clip_image embedding" in "\n".join(retrieval_section(run))
    # another vision model than the one the stage was trained against is refused
    with pytest.raises(ConfigError, match="is not the vision model stage clip_image was trained against"):
        semantic_retrieval(load_config(twin_config(things_twin), _things_sets(things_twin, "stages.clip_image.tiny_dim=16")),
                           run, log=lambda m: None)


@pytest.mark.slow
def test_trains_on_ray_train(ray_session, things_twin, tmp_path):
    from neuroimagen import backends
    from neuroimagen.runs.training import train

    cfg = load_config(twin_config(things_twin), _things_sets(
        things_twin, "train.backend=ray", "train.threads_per_worker=1", "stages.clip_image.epochs=2"))
    m = train(cfg, tmp_path / "ray", ["clip_image"], log=lambda m: None, fit=backends.fit_stage)["clip_image"]
    assert m["world_size"] == 1 and 0.0 <= m["val_top1"] <= 1.0 and m["epochs"] == 2
    assert (tmp_path / "ray" / "clip_image" / "model" / "model.json").is_file()
