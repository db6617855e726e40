"""Stage 3 on the tiny twin: model selection on the training objective's scale, and the text-encoder record."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuroimagen.stages import build_stage
from neuroimagen.stages.semantic import SemanticStage
from neuroimagen.training.context import RunContext
from neuroimagen.training.loop import LocalReporter, fit


class _Fixed(nn.Module):
    """A 'regressor' whose validation predictions are given: (M, L, E), with the stage's target statistics."""

    def __init__(self, pred: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("pred", pred.clone())
        self.register_buffer("target_std", std.clone())

    def forward(self, x):
        return self.pred[: x.shape[0]]


class _Scripted(SemanticStage):
    """The real stage with a scripted prediction per epoch (no optimisation): isolates model selection."""

    script: list = []

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.model = self._modules["regressor"] = self.script[epoch]

    def train_step(self, batch):
        return {"std_mse": 0.0}


def test_selection_follows_the_standardised_objective_not_raw_mse(semantic_parts, tmp_path):
    cfg, splits, targets, _ = semantic_parts
    stage = _Scripted(cfg, RunContext(), {"splits": splits, "targets": targets})
    t = stage.t_val  # (M, L, E)
    L, E = t.shape[1:]
    # CLIP-L-like targets: one channel with a huge spread, the others small
    std = torch.full((L, E), 0.1)
    std[:, 0] = 30.0
    big = torch.zeros(L, E, dtype=torch.bool)
    big[:, 0] = True
    # epoch 0: exact on the huge channel, 3 std off on every other element (raw MSE small, objective ~9)
    raw_good = torch.where(big, t, t + 3 * std)
    # epoch 1: half a std off everywhere (objective 0.25, raw MSE dominated by the huge channel)
    std_good = t + 0.5 * std
    _Scripted.script = [_Fixed(raw_good, std), _Fixed(std_good, std)]
    stage.model = stage._modules["regressor"] = _Fixed(t, std)
    res = fit(stage, RunContext(), LocalReporter(tmp_path / "ckpt"), epochs=2, val_every=1, seed=0, log=None)
    h = res.history
    assert h[0]["val_mse"] < h[1]["val_mse"]  # raw MSE would pick epoch 0 ...
    assert res.best["epoch"] == 1 and res.best["metric"] == "val_std_mse"  # ... the objective picks epoch 1
    assert h[0]["val_std_mse"] == pytest.approx(9.0 * (E - 1) / E, rel=1e-4)
    assert h[1]["val_std_mse"] == pytest.approx(0.25, rel=1e-4)


def test_the_regressor_records_the_text_encoder_of_its_targets(semantic_parts):
    cfg, splits, targets, run_dir = semantic_parts
    stage = build_stage("semantic", cfg, RunContext(), {"splits": splits, "targets": targets})
    rec = stage.specs()["regressor"]["targets"]
    from neuroimagen.stages.semantic import text_encoder_for

    te = text_encoder_for(cfg, run_dir)
    assert rec == {"captions": "label", "text_encoder": te.identity, "text_encoder_fingerprint": te.fingerprint}
    assert stage.describe_data()["text_encoder_fingerprint"] == te.fingerprint
    v = stage.validate()
    assert set(v) >= {"val_std_mse", "val_mse", "val_cosine", "val_nearest_class_acc"}
    assert SemanticStage.select_metric == "val_std_mse" and "selected on val_std_mse" in SemanticStage.protocol


# ----------------------------------------------------------------------------------------------
# Reconstruction refuses a diffusion model whose text encoder is not the one stage 3 was trained on


def _export_regressor(stage, directory):
    from neuroimagen.training.checkpoint import export_model

    states = {"regressor": {k: v.detach().clone() for k, v in stage.model.state_dict().items()}}
    return export_model(directory, {"regressor": stage.specs()["regressor"]}, states)


def _fake_snapshot(directory, te):
    """A directory in the Stable Diffusion layout whose tokenizer/ and text_encoder/ are ``te`` (no real UNet/VAE)."""
    te.save(directory)
    (directory / "model_index.json").write_text("{}")
    for d in ("vae", "unet", "scheduler"):
        (directory / d).mkdir()
    return directory


@pytest.fixture(scope="module")
def two_snapshots(semantic_parts, tmp_path_factory):
    """(same weights as stage 3's text encoder, same shapes but other weights)."""
    from neuroimagen.models.text_encoder import build_tiny_text_encoder
    from neuroimagen.stages.semantic import text_encoder_for

    cfg, _, _, run_dir = semantic_parts
    tc = cfg.text_encoder
    root = tmp_path_factory.mktemp("snapshots")
    same = _fake_snapshot(root / "same", text_encoder_for(cfg, run_dir))
    other_te = build_tiny_text_encoder(seed=cfg.seed + 1, hidden_size=tc.hidden_size, num_layers=tc.num_layers,
                                       num_heads=tc.num_heads, max_length=tc.max_length)
    other = _fake_snapshot(root / "other", other_te)
    return same, other


def test_check_text_encoder_compares_weights_not_shapes(semantic_parts, two_snapshots, tmp_path):
    from neuroimagen.errors import ConfigError
    from neuroimagen.models.text_encoder import load_text_encoder
    from neuroimagen.reconstruction.factory import check_text_encoder

    cfg, splits, targets, _ = semantic_parts
    stage = build_stage("semantic", cfg, RunContext(), {"splits": splits, "targets": targets})
    model_dir = _export_regressor(stage, tmp_path / "semantic" / "model")
    same, other = two_snapshots
    a, b = load_text_encoder(same), load_text_encoder(other)
    assert a.encode(["An image of x"]).shape == b.encode(["An image of x"]).shape  # shapes cannot tell them apart
    check_text_encoder({"semantic": str(model_dir)}, str(same))  # the snapshot's own encoder: fine
    check_text_encoder({"encoder": str(model_dir)}, str(other))  # no stage-3 model: nothing to check
    with pytest.raises(ConfigError) as err:
        check_text_encoder({"semantic": str(model_dir)}, str(other))
    msg = str(err.value)
    assert "\n" not in msg and str(model_dir) in msg and str(other) in msg
    assert a.fingerprint in msg and b.fingerprint in msg and "--stages semantic" in msg
    # the configured text encoder (Decode's empty and true-caption prompts) is held to the same rule
    check_text_encoder({}, str(same), configured=str(same))
    with pytest.raises(ConfigError, match=r"^text_encoder.pretrained: .*other.* has other weights"):
        check_text_encoder({}, str(same), configured=str(other))


def test_reconstruct_stops_before_generating_with_another_text_encoder(semantic_parts, two_snapshots, tmp_path):
    """The run's stage-3 model came from text encoder A; ldm.pretrained names a snapshot with encoder B."""
    import dataclasses
    import json

    from neuroimagen.errors import ConfigError
    from neuroimagen.runs.evaluation import reconstruct

    cfg, splits, targets, _ = semantic_parts
    stage = build_stage("semantic", cfg, RunContext(), {"splits": splits, "targets": targets})
    run = tmp_path / "run"
    _export_regressor(stage, run / "semantic" / "model")
    (run / "run.json").write_text(json.dumps({"stages": {"semantic": {"model": "semantic/model", "finished": "t"}}}))
    same, other = two_snapshots

    def executed(*a, **k):
        raise AssertionError("rows were generated")

    for snapshot, ok in ((other, False), (same, True)):
        c = dataclasses.replace(cfg, ldm=dataclasses.replace(cfg.ldm, pretrained=str(snapshot)),
                                text_encoder=dataclasses.replace(cfg.text_encoder, pretrained=str(snapshot)),
                                eval=dataclasses.replace(cfg.eval, backend="local"))
        if ok:  # passes the check, then fails later on the fake snapshot's missing UNet config, not on the encoder
            with pytest.raises(Exception) as err:
                reconstruct(c, run, variants=["L"], log=lambda m: None, execute=executed)
            assert "stage-3 regressor" not in str(err.value) and "unet/ or vae/ config.json" in str(err.value)
        else:
            with pytest.raises(ConfigError, match="stage-3 regressor 'semantic' was trained on caption embeddings"):
                reconstruct(c, run, variants=["L"], log=lambda m: None, execute=executed)


def test_a_tie_on_the_validation_metric_keeps_the_later_epoch(semantic_parts, tmp_path):
    """A small validation split saturates a coarse metric (k-NN accuracy on 24 items reads 0.875 from epoch 0
    on); keeping the first of equal epochs exported an encoder trained for one epoch. Equal scores keep the later."""
    cfg, splits, targets, _ = semantic_parts
    stage = _Scripted(cfg, RunContext(), {"splits": splits, "targets": targets})
    t = stage.t_val
    std = torch.full(t.shape[1:], 0.1)
    _Scripted.script = [_Fixed(t + 0.5 * std, std), _Fixed(t + 0.5 * std, std), _Fixed(t + 2 * std, std)]
    stage.model = stage._modules["regressor"] = _Fixed(t, std)
    res = fit(stage, RunContext(), LocalReporter(tmp_path / "ckpt"), epochs=3, val_every=1, seed=0, log=None)
    assert res.history[0]["val_std_mse"] == res.history[1]["val_std_mse"] < res.history[2]["val_std_mse"]
    assert res.best["epoch"] == 1
