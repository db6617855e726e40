"""The guards of every exported stage: did it learn (all stages), did the saliency GAN collapse to images that do not
depend on the EEG (stage 2), does the semantic regressor beat shuffled EEG (stage 3). Tiny twin, no Ray."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch import nn

from neuroimagen.config import load_config
from neuroimagen.runs.training import export_stage, train
from neuroimagen.stages import stage_guards
from neuroimagen.stages.base import shuffled_index
from neuroimagen.stages.saliency import SaliencyStage
from neuroimagen.stages.semantic import SemanticStage
from neuroimagen.training.context import RunContext
from neuroimagen.training.loop import LocalReporter, fit, learning_guard


def _guard_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "guard:" in r.getMessage()]


def test_shuffled_index_is_a_seeded_derangement():
    a = shuffled_index(50, seed=3)
    assert sorted(a.tolist()) == list(range(50)) and not (a == torch.arange(50)).any()
    assert torch.equal(a, shuffled_index(50, seed=3)) and not torch.equal(a, shuffled_index(50, seed=4))
    assert shuffled_index(1, seed=0).tolist() == [0] and shuffled_index(2, seed=0).tolist() == [1, 0]


# ----------------------------------------------------------------------------------------------
# did not learn: stage-agnostic, on the selection metric and its direction


def _best(value, epoch, untrained, mode="max", metric="val_acc"):
    return {"metric": metric, "mode": mode, "value": value, "epoch": epoch, "untrained": {metric: untrained}}


def _history(values, metric="val_acc", val_every=1):
    return [{"epoch": e, **({metric: v} if (e + 1) % val_every == 0 else {})} for e, v in enumerate(values)]


def test_learning_guard_compares_the_best_epoch_with_the_untrained_model_and_the_first_epoch():
    ok = learning_guard(_best(0.6, 2, 0.2), _history([0.3, 0.5, 0.6]))
    assert not ok["fired"] and ok["gain"] == pytest.approx(0.4) and ok["reason"] == "" and ok["validations"] == 3
    same = learning_guard(_best(0.2, 2, 0.2), _history([0.2, 0.2, 0.2]))  # lr = 0: every epoch equals untrained
    assert same["fired"] and same["gain"] == 0.0
    assert same["reason"] == "no gain over the untrained model (val_acc 0.2 vs untrained 0.2, higher is better)"
    first = learning_guard(_best(0.5, 0, 0.2), _history([0.5, 0.4, 0.3]))  # beat untrained once, then only worse
    assert first["fired"] and first["reason"] == "best epoch is the first validated one (epoch 1: no later epoch beat it)"
    # validation every 2nd epoch: the first validated epoch is epoch 1 (0-based)
    assert learning_guard(_best(0.5, 1, 0.2), _history([None, 0.5, None, 0.4], val_every=2))["fired"]
    assert not learning_guard(_best(0.5, 3, 0.2), _history([None, 0.4, None, 0.5], val_every=2))["fired"]
    # one validation only: "the first epoch" is no evidence of anything; the untrained comparison still is
    assert not learning_guard(_best(0.5, 0, 0.2), _history([0.5]))["fired"]
    # min mode: a loss that went up is no gain
    worse = learning_guard(_best(1.2, 1, 1.0, mode="min", metric="val_loss"), _history([1.3, 1.2], "val_loss"))
    assert worse["fired"] and worse["gain"] == pytest.approx(-0.2) and "lower is better" in worse["reason"]
    assert not learning_guard(_best(0.4, 1, 1.0, mode="min", metric="val_loss"), _history([0.5, 0.4], "val_loss"))["fired"]
    # a checkpoint without the untrained record: only the epoch criterion applies
    old = dict(_best(0.5, 1, 0.2), untrained={})
    assert not learning_guard(old, _history([0.4, 0.5]))["fired"] and learning_guard(old, _history([0.4, 0.5]))["gain"] is None


def _encoder_sets(twin, *extra):
    return ["train.backend=local", "train.progress=false", "train.threads_per_worker=1", f"data.eeg={twin / 'eeg_5_95_std.pth'}",
            f"data.splits={twin / 'block_splits_by_image_all.pth'}", f"data.images={twin / 'images'}",
            "stages.encoder.epochs=3", "stages.encoder.embed_dim=16", "stages.encoder.classes_per_batch=3",
            "stages.encoder.samples_per_class=3", *extra]


@pytest.mark.parametrize("lr", [1e-30, 1e-3])
def test_the_encoder_guard_fires_when_it_cannot_learn_and_not_when_it_does(twin, tmp_path, caplog, lr):
    caplog.set_level(logging.INFO, logger="neuroimagen")
    m = train(load_config(None, _encoder_sets(twin, f"stages.encoder.lr={lr}")), tmp_path / "r", ["encoder"],
              log=lambda msg: None)["encoder"]
    stored = json.loads((tmp_path / "r" / "encoder" / "metrics.json").read_text())
    g = stored["guards"]["did_not_learn"]
    assert stored["guards"] == m["guards"] and g["metric"] == "val_knn_acc" and g["mode"] == "max"
    assert g["untrained"] == stored["untrained"]["val_knn_acc"] and g["best"] == stored["val_knn_acc"]
    lines = _guard_lines(caplog)
    if lr == 1e-30:  # (lr 0 is refused) no step moves a float32 weight; only normalisation statistics drift
        assert g["fired"] and g["gain"] <= 0.0 and stored["guards"]["fired"] == ["did_not_learn"]
        assert lines == [f"[encoder] guard: did not learn: no gain over the untrained model (val_knn_acc "
                         f"{g['best']:.4g} vs untrained {g['untrained']:.4g}, higher is better)"]
    else:
        assert not g["fired"] and g["gain"] > 0 and stored["guards"]["fired"] == [] and lines == []


# ----------------------------------------------------------------------------------------------
# collapsed: the saliency GAN's images do not depend on the EEG


class _MeanImage(nn.Module):
    """A G that draws one image whatever the EEG and z: the validation split's mean image (beats the training mean)."""

    def __init__(self, img):  # img: (M, 3, R, R) in [0, 1]
        super().__init__()
        self.register_buffer("img", img.mean(0, keepdim=True) * 2 - 1)

    def forward(self, z, c):
        return self.img.expand(len(c), -1, -1, -1)


class _Oracle(nn.Module):
    """A G that reads the EEG: the image of the validation item whose features are nearest (z ignored)."""

    def __init__(self, feats, img):
        super().__init__()
        self.register_buffer("feats", feats.clone())
        self.register_buffer("img", img * 2 - 1)

    def forward(self, z, c):
        return self.img[torch.cdist(c.float(), self.feats).argmin(1)]


class _ZOnly(nn.Module):
    """A G whose images vary with z and not at all with the EEG."""

    def forward(self, z, c):
        return torch.tanh(z[:, :3, None, None].expand(-1, -1, 32, 32))


class _Installed(SaliencyStage):
    """The real stage 2 with a given G from epoch 0 on and no optimisation (the untrained model stays the real G)."""

    install = None

    def set_epoch(self, epoch):
        super().set_epoch(epoch)
        self.G = self._modules["generator"] = self.install(self)

    def train_step(self, batch):
        return {"g_total": 0.0}


def _export(stage, cfg, tmp_path, epochs=2):
    reporter = LocalReporter(tmp_path / "ckpt")
    fit(stage, RunContext(), reporter, epochs=epochs, val_every=1, seed=0, log=None)
    export_stage("saliency", cfg, tmp_path / "run", reporter.restore())
    return json.loads((tmp_path / "run" / "saliency" / "metrics.json").read_text())


@pytest.mark.parametrize("kind", ["mean-image", "z-only", "oracle"])
def test_the_collapse_guard_fires_for_a_g_that_ignores_the_eeg_and_not_for_one_that_reads_it(
        saliency_parts, tmp_path, caplog, kind):
    cfg, inputs = saliency_parts
    make = {"mean-image": lambda st: _MeanImage(st.img_val), "z-only": lambda st: _ZOnly(),
            "oracle": lambda st: _Oracle(st.f_val, st.img_val)}[kind]
    stage = type("Scripted", (_Installed,), {"install": staticmethod(make)})(cfg, RunContext(), inputs)
    caplog.set_level(logging.INFO, logger="neuroimagen")
    m = _export(stage, cfg, tmp_path)
    g = m["guards"]["collapsed"]
    assert g["condition_gain"] == pytest.approx(m["val_ssim"] - m["val_ssim_shuffled"])
    assert g["spread_conditions"] == m["val_spread_conditions"] and g["spread_z"] == m["val_spread_z"]
    lines = _guard_lines(caplog)
    if kind == "oracle":
        assert not g["fired"] and g["condition_gain"] > g["tolerance"] and g["spread_conditions"] > 0.05, g
        assert g["spread_z"] == 0.0 and m["guards"]["fired"] == [] and lines == []
        return
    assert g["fired"] and "collapsed" in m["guards"]["fired"]
    assert len(lines) == 1 and lines[0].startswith("[saliency] guard: ") and "collapsed: " + g["reason"] in lines[0]
    assert "not above its SSIM with shuffled ones" in g["reason"]
    if kind == "mean-image":  # the EEG failure mode: one condition-independent image beating the mean training image
        assert m["val_ssim"] > m["baseline_mean_image_ssim"]
        assert g["spread_conditions"] == 0.0 and g["spread_z"] == 0.0 and g["condition_gain"] == 0.0
        assert "G's images barely change with the EEG (mean pixel std across conditions 0 < 0.001)" in g["reason"]
    else:
        assert g["spread_conditions"] == 0.0 < g["spread_z"] and "barely change with the EEG" in g["reason"]


def test_a_real_g_on_constant_eeg_features_is_flagged_as_collapsed(saliency_parts, tmp_path):
    """Stage 2 trained (one epoch, the real G, D and losses) on an encoder whose weights are all 0: every trial's
    features are the same vector, so nothing G draws can depend on the EEG."""
    from neuroimagen.stages import build_stage

    cfg, inputs = saliency_parts
    dead = {k: torch.zeros_like(v) for k, v in inputs["encoder_state"].items()}
    stage = build_stage("saliency", cfg, RunContext(), dict(inputs, encoder_state=dead))
    assert torch.equal(stage.f_val, stage.f_val[:1].expand_as(stage.f_val))
    res = fit(stage, RunContext(), LocalReporter(tmp_path / "ckpt"), epochs=1, val_every=1, seed=0, log=None)
    guards = stage_guards("saliency", res.best, res.history, stage.describe_data())
    g = guards["collapsed"]
    assert g["fired"] and g["spread_conditions"] == 0.0 and g["spread_z"] > 0 and g["condition_gain"] == 0.0, g
    assert guards["warning"].startswith("[saliency] guard: ") and "collapsed: G's images barely change" in guards["warning"]


# ----------------------------------------------------------------------------------------------
# stage 3: the shuffled-EEG control


class _Predicts(nn.Module):
    """A 'regressor' whose validation predictions are given: (M, L, E)."""

    def __init__(self, pred, std):
        super().__init__()
        self.register_buffer("pred", pred.clone())
        self.register_buffer("target_std", std.clone())

    def forward(self, x):
        return self.pred[: x.shape[0]]


def test_the_shuffled_eeg_control_sits_near_chance_where_the_true_rate_is_high(semantic_parts):
    cfg, splits, targets, _ = semantic_parts
    stage = SemanticStage(cfg, RunContext(), {"splits": splits, "targets": targets})
    t, M, K = stage.t_val, len(stage.y_val), len(stage.prototypes)
    data = stage.describe_data()
    stage.model = _Predicts(t, torch.ones(t.shape[1:]))  # the label-caption embedding of each trial's own class
    v = stage.validate()
    assert v["val_nearest_class_acc"] == 1.0
    # the same predictions scored on the permuted trials: the fraction of trials whose partner shares their class
    partner = stage.y_val[stage.shuffle_val]
    assert v["val_nearest_class_shuffled"] == pytest.approx(float((partner == stage.y_val).double().mean()))
    chance = 1 / K
    assert abs(v["val_nearest_class_shuffled"] - chance) <= 3 * math.sqrt(chance * (1 - chance) / M), (v, M, K)
    g = SemanticStage.guards(data, v)["ignores_eeg"]
    assert not g["fired"] and g["gain"] == pytest.approx(1.0 - v["val_nearest_class_shuffled"]) and g["n"] == M
    assert "shuffled" in SemanticStage.protocol
    # one prediction for every trial (the mean caption): no better than shuffled EEG
    stage.model = _Predicts(t.mean(0, keepdim=True).expand_as(t), torch.ones(t.shape[1:]))
    flat = stage.validate()
    assert flat["val_nearest_class_acc"] == flat["val_nearest_class_shuffled"]
    g = SemanticStage.guards(data, flat)["ignores_eeg"]
    assert g["fired"] and g["reason"].startswith("the regressor's nearest-class rate")


# ----------------------------------------------------------------------------------------------
# the report


def test_the_report_shows_each_stage_guard_and_its_warning(tmp_path):
    from test_reports import make_run

    from neuroimagen.runs.reports import stage_guard_section, write_report

    run = make_run(tmp_path)
    assert stage_guard_section(run) == []  # no run.json: no section
    best = {"metric": "val_knn_acc", "mode": "max", "value": 0.25, "epoch": 2, "untrained": {"val_knn_acc": 0.25},
            "metrics": {"val_knn_acc": 0.25}}
    enc = {"stage": "encoder", "best_epoch": 2, "epochs": 3,
           "guards": stage_guards("encoder", best, _history([0.25, 0.25, 0.25], "val_knn_acc"), {})}
    sal_metrics = {"val_ssim": 0.4, "val_ssim_shuffled": 0.2, "val_condition_gain": 0.2, "val_condition_gain_se": 0.01,
                   "val_spread_conditions": 0.06, "val_spread_z": 0.04}
    sal_best = {"metric": "val_ssim", "mode": "max", "value": 0.4, "epoch": 1, "untrained": {"val_ssim": 0.3},
                "metrics": sal_metrics}
    sal = {"stage": "saliency", "best_epoch": 1, "epochs": 2, **sal_metrics,
           "guards": stage_guards("saliency", sal_best, _history([0.35, 0.4], "val_ssim"), {})}
    for name, m in (("encoder", enc), ("saliency", sal)):
        (run / name).mkdir(exist_ok=True)
        (run / name / "metrics.json").write_text(json.dumps(m))
    (run / "run.json").write_text(json.dumps({"stages": {n: {"metrics": f"{n}/metrics.json"} for n in ("encoder", "saliency")}}))
    text = write_report(run).read_text()
    body = text[text.index("## Stages 1-3: guards"):text.index("## Protocol")]
    rows = [ln for ln in body.splitlines() if ln.startswith("| encoder") or ln.startswith("| saliency")]
    assert rows[0] == "| encoder | val_knn_acc (max) | 0.2500 | 0.2500 | 3/3 | — | did_not_learn |"
    assert rows[1].startswith("| saliency | val_ssim (max) | 0.4000 | 0.3000 | 2/2 | SSIM 0.400 vs 0.200 shuffled (gain "
                              "0.2000 ± 0.0100)") and rows[1].endswith("| ok |")
    assert ("> **Warning (encoder: did not learn):** no gain over the untrained model (val_knn_acc 0.25 vs untrained "
            "0.25, higher is better)") in body
    assert "Warning (saliency" not in body
