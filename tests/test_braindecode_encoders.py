"""braindecode models as encoders (`stages.encoder.name: braindecode:<Model>`): the encoders' (B, C, T) ->
(B, embed_dim) contract, the config's one-line errors, and one epoch of stage 1 on the quick twin per model."""

from __future__ import annotations

import json
import re

import pytest
import torch

from neuroimagen.config import BRAINDECODE_ENCODERS, ENCODER_NAMES, load_config
from neuroimagen.errors import ConfigError
from neuroimagen.models.eeg_encoders import ENCODERS, build_encoder

pytest.importorskip("braindecode")

MODELS = ["EEGNet", "ShallowFBCSPNet", "Deep4Net", "EEGConformer", "ATCNet"]
SHAPES = [(128, 440), (17, 100), (63, 250), (8, 440)]  # EEG-ImageNet, both THINGS-EEG2 layouts, a few channels
EMBED = 24


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on a shared 2-core machine (as tests/test_eeg_encoders.py)
    yield
    torch.set_num_threads(old)


def make(model: str, shape, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_encoder(f"braindecode:{model}", shape[0], shape[1], EMBED, **kw)


def test_the_config_lists_the_registry_and_every_model_it_names():
    assert set(ENCODER_NAMES) == set(ENCODERS)
    assert set(MODELS) <= set(BRAINDECODE_ENCODERS)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("model", MODELS)
def test_forward_backward(model, shape):
    m = make(model, shape, dropout=0.1).train()
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    z = m(x)
    assert z.shape == (3, EMBED) and z.dtype == torch.float32 and torch.isfinite(z).all()
    # the final layer is the embedding, not log-probabilities of EMBED classes
    assert not torch.allclose(z.exp().sum(1), torch.ones(3), atol=1e-3)
    z.square().sum().backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    m.eval()
    with torch.no_grad():
        a, b = m(x[:1]), m(x[:1])
        assert torch.equal(a, b) and a.shape == (1, EMBED)  # eval: no dropout, BN on running stats
        assert not torch.allclose(m(x[:1]), m(x[1:2]))  # depends on its input
        assert not torch.allclose(a, make(model, shape, seed=8).eval()(x[:1]))  # another seed, another model


@pytest.mark.parametrize("model", MODELS)
def test_l2_normalize_and_dropout(model):
    shape = (17, 100)
    m = make(model, shape, l2_normalize=True, dropout=0.15)
    with torch.no_grad():
        z = m.eval()(torch.randn(4, *shape))
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
    rates = [mod.p for mod in m.modules() if isinstance(mod, torch.nn.Dropout)]
    # every rate the model takes as an argument; a couple are fixed in the models (EEGConformer's classifier, ATCNet)
    assert rates.count(0.15) >= max(1, len(rates) - 2), rates


def test_eegnetv4_is_eegnet():
    a, b = make("EEGNetv4", (17, 100)), make("EEGNet", (17, 100))
    assert type(a.net) is type(b.net)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_too_short_segments_fail_at_construction_in_one_line():
    with pytest.raises(ValueError, match=r"braindecode:ShallowFBCSPNet cannot read segments of 32 samples x 4 "
                                         r"channels \(too short for its kernels and pools\?\)") as err:
        make("ShallowFBCSPNet", (4, 32))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"braindecode:EEGNet keeps its published sizes: width must be null, got 8"):
        make("EEGNet", (17, 100), width=8)


@pytest.mark.parametrize("value, message", [
    ("braindecode:EEGNetV4", "stages.encoder.name: unknown braindecode model 'EEGNetV4' (did you mean "
                             "'braindecode:EEGNetv4'?); supported: EEGNet, EEGNetv4, ShallowFBCSPNet"),
    ("tsconf", "stages.encoder.name: unknown encoder 'tsconf' (did you mean 'tsconv'?); expected one of lstm, "
               "channelnet, tsconv or braindecode:<Model> with Model one of EEGNet"),
])
def test_bad_names_are_one_line_config_errors(value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [f"stages.encoder.name={value}"])
    with pytest.raises(ConfigError, match=re.escape(message.replace("stages.encoder.name", "stages.semantic.encoder"))):
        load_config(None, [f"stages.semantic.encoder={value}"])


def test_width_with_a_braindecode_model_is_a_config_error():
    with pytest.raises(ConfigError, match=re.escape("stages.encoder.width: braindecode:ATCNet keeps its published "
                                                    "sizes; expected null, got 16")):
        load_config(None, ["stages.encoder.name=braindecode:ATCNet", "stages.encoder.width=16"])
    cfg = load_config(None, ["stages.encoder.name=braindecode:ATCNet"])
    assert cfg.stages.encoder.name == "braindecode:ATCNet"


@pytest.fixture(scope="module")
def quick_twin(tmp_path_factory):
    """The quick demo's twin (6 classes x 20 images, 2 subjects, 16 channels, 32 px)."""
    from neuroimagen.data.synthetic import synthesize
    from neuroimagen.runs.demo import demo_overrides

    sets = [s for s in demo_overrides(quick=True, seed=0) if s.startswith("synth.")]
    root = tmp_path_factory.mktemp("quick-twin") / "d"
    synthesize(root, load_config(None, sets).synth, show_progress=False)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_stage_one_trains_an_epoch_with_every_model(quick_twin, tmp_path, model):
    """One epoch of stage 1 (triplet loss, local backend) per model on the quick twin: a checkpoint and finite
    validation metrics, with the model named in the exported model.json (so reconstruct rebuilds it)."""
    from neuroimagen.runs.training import train

    cfg = load_config(quick_twin / "config.yaml", [f"stages.encoder.name=braindecode:{model}", "stages.encoder.epochs=1",
                                                   "stages.encoder.embed_dim=32", "train.backend=local",
                                                   "train.progress=false"])
    metrics = train(cfg, tmp_path / "run", ["encoder"], log=lambda m: None)["encoder"]
    assert 0.0 <= metrics["val_knn_acc"] <= 1.0 and metrics["epochs"] == 1 and metrics["best_epoch"] == 0
    spec = json.loads((tmp_path / "run" / "encoder" / "model" / "model.json").read_text())
    assert spec["modules"]["encoder"]["kwargs"]["name"] == f"braindecode:{model}"
