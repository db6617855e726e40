"""The synthetic twin: deterministic per seed, real layouts, learnable but not trivial."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_EEG_IMAGENET, TINY_THINGS, make_twin
from neuroimagen.config import SynthConfig, load_config
from neuroimagen.data.datasets import load_splits
from neuroimagen.data.synthetic import THINGS_17, EEGModel, class_look, synthesize
from neuroimagen.errors import ConfigError
from neuroimagen.probe import probe_datasets, sampling_rate


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kw", [TINY_EEG_IMAGENET, TINY_THINGS], ids=["eeg-imagenet", "things-eeg"])
def test_same_seed_same_bytes(tmp_path, kw):
    small = {**kw, "classes": 3}
    a = digest(make_twin(tmp_path / "a", **small))
    b = digest(make_twin(tmp_path / "b", **small))
    assert a == b
    c = digest(make_twin(tmp_path / "c", **{**small, "seed": small["seed"] + 1}))
    top = lambda d: {k for k in d if "/" not in k}  # noqa: E731 - image stems are random too
    assert top(a) == top(c) and a != c


def test_eeg_imagenet_layout(twin):
    names = {p.name for p in twin.iterdir()}
    assert {"eeg_5_95_std.pth", "eeg_14_70_std.pth", "eeg_55_95_std.pth", "eeg_signals_raw_with_mean_std.pth",
            "block_splits_by_image_all.pth", "block_splits_by_image_single.pth", "images", "captions.json",
            "attributes.json", "config.yaml"} <= names
    obj = torch.load(twin / "eeg_signals_raw_with_mean_std.pth", weights_only=True)
    assert set(obj) == {"dataset", "labels", "images", "means", "stddevs"}
    seg = obj["dataset"][0]
    assert set(seg) == {"eeg", "image", "label", "subject"} and seg["eeg"].dtype == torch.float32
    assert seg["eeg"].shape[0] == TINY_EEG_IMAGENET["channels"]
    lengths = np.array([d["eeg"].shape[1] for d in obj["dataset"]])
    assert lengths.min() >= 491 and np.median(lengths) < 530
    assert obj["labels"][0] == "n02389026"  # the released label order
    sp = torch.load(twin / "block_splits_by_image_all.pth", weights_only=True)
    assert len(sp["splits"]) == 6 and set(sp["splits"][0]) == {"train", "val", "test"}
    # every image has a caption naming its attributes
    caps = json.loads((twin / "captions.json").read_text())
    assert set(caps) == set(obj["images"])
    attrs = json.loads((twin / "attributes.json").read_text())
    stem = obj["images"][0]
    assert attrs[stem]["colour"] in caps[stem] and attrs[stem]["shape"] in caps[stem]


def test_things_layout(things_twin):
    d = np.load(things_twin / "sub-01" / "preprocessed_eeg_training.npy", allow_pickle=True).item()
    K, n, Kt = TINY_THINGS["classes"], TINY_THINGS["images_per_class"], TINY_THINGS["test_classes"]
    assert d["preprocessed_eeg_data"].shape == (K * n, TINY_THINGS["train_repetitions"], 17, 100)
    assert tuple(d["ch_names"]) == THINGS_17 and len(d["times"]) == 100
    t = np.load(things_twin / "sub-02" / "preprocessed_eeg_test.npy", allow_pickle=True).item()
    assert t["preprocessed_eeg_data"].shape == (Kt, TINY_THINGS["test_repetitions"], 17, 100)
    image_set = things_twin / "image_set"
    folders = {w: sorted(p.name for p in (image_set / f"{w}_images").iterdir()) for w in ("training", "test")}
    assert folders["training"] == ["00001_anemone_fish", "00002_iron", "00003_parachute", "00004_sorrel"]
    assert folders["test"] == ["00001_coffee_mug", "00002_espresso_maker", "00003_mountain_bike"]
    # zero-shot, as the release: no test concept is a training concept; one image per test concept
    concept = lambda f: f.split("_", 1)[1]  # noqa: E731
    assert not {concept(f) for f in folders["training"]} & {concept(f) for f in folders["test"]}
    assert all(len(list((image_set / "test_images" / f).iterdir())) == 1 for f in folders["test"])
    assert all(len(list((image_set / "training_images" / f).iterdir())) == n for f in folders["training"])
    # image_metadata.npy: the release's keys, one entry per image in EEG row order
    meta = np.load(image_set / "image_metadata.npy", allow_pickle=True).item()
    assert set(meta) == {f"{s}_img_{k}" for s in ("train", "test") for k in ("files", "concepts", "concepts_THINGS")}
    assert len(meta["train_img_files"]) == K * n and len(meta["test_img_files"]) == Kt
    assert meta["test_img_files"][0] == "coffee_mug_01s.jpg" and meta["test_img_concepts"][0] == "00001_coffee_mug"
    assert meta["train_img_files"][:2] == ["anemone_fish_01b.jpg", "anemone_fish_02b.jpg"]
    assert all((image_set / "training_images" / c / f).is_file()
               for c, f in zip(meta["train_img_concepts"], meta["train_img_files"]))
    # the concept's number in the whole (alphabetical) concept list: coffee mug is second after anemone fish
    assert meta["test_img_concepts_THINGS"][0] == "00002_coffee_mug"
    assert meta["train_img_concepts_THINGS"][-1] == f"{K + Kt:05d}_sorrel"


def test_things_63x250_layout_and_repetitions(tmp_path):
    root = make_twin(tmp_path / "t", **{**TINY_THINGS, "layout": "63x250", "classes": 2, "test_classes": 2,
                                        "images_per_class": 10, "subjects": 1, "train_repetitions": 4,
                                        "test_repetitions": 5})
    d = np.load(root / "sub-01" / "preprocessed_eeg_training.npy", allow_pickle=True).item()
    t = np.load(root / "sub-01" / "preprocessed_eeg_test.npy", allow_pickle=True).item()
    assert d["preprocessed_eeg_data"].shape == (20, 4, 63, 250) and t["preprocessed_eeg_data"].shape == (2, 5, 63, 250)
    assert len(d["ch_names"]) == 63 == len(set(d["ch_names"])) and len(d["times"]) == 250
    assert [d["ch_names"].index(c) for c in THINGS_17] == sorted(d["ch_names"].index(c) for c in THINGS_17)


@pytest.mark.parametrize("kw, message", [
    ({"classes": 30, "test_classes": 11}, "synth.test_classes: expected classes + test_classes <= 40"),
    ({"layout": "17x100", "channels": 63, "times": 250}, "synth.layout: 17x100 fixes channels x times, but"),
    ({"format": "eeg-imagenet", "layout": "17x100"}, "synth.layout: only for format things-eeg"),
])
def test_things_synth_settings_are_checked(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        synthesize(tmp_path / "t", SynthConfig(**{**TINY_THINGS, **kw}), show_progress=False)
    assert not (tmp_path / "t").exists()


def test_things_test_concepts_are_decodable_from_parts_seen_in_training():
    """The factorial class code: an unseen (shape, colour) pair's code is predicted from its parts."""
    looks = [class_look(c) for c in range(28)]  # training concepts 0..19 (every shape and colour), test 20..27
    model = EEGModel(np.random.default_rng(0), 28, 1, 8, 100.0, onset=0.2, snr=1.0)
    model.factorial(looks, np.random.default_rng(1))
    a = model.class_amp  # (K, S)
    assert not set(looks[20:]) & set(looks[:20]) and len(set(looks)) == 28
    # a linear read-out of the parts fitted on the training concepts predicts every test concept's code
    parts = sorted({p for look in looks for p in look})
    X = np.array([[float(p in look) for p in parts] for look in looks])  # (K, parts) indicator design
    coef, *_ = np.linalg.lstsq(X[:20], a[:20], rcond=None)
    assert np.allclose(X[20:] @ coef, a[20:], atol=1e-8)
    # the evoked signal itself adds: a class's noise-free trial is its shape part's plus its colour part's
    for code in ("sources", "erp"):
        m = EEGModel(np.random.default_rng(0), 28, 1, 8, 100.0, onset=0.2, snr=1.0, code=code)
        m.factorial(looks, np.random.default_rng(1))
        zero = np.zeros(4)

        def clean(c, part=None):
            if part is not None:
                m.part_amp = full.copy()
                m.part_amp[c, 1 - part] = 0.0
            x = m.clean(c, zero, 0, 100, np.random.default_rng(3))  # same jitter draws for every call
            m.part_amp = full
            return x

        full = m.part_amp
        for c in (20, 27):
            assert np.allclose(clean(c), clean(c, 0) + clean(c, 1), atol=1e-10), code


def test_the_probes_chance_counts_the_classes_it_was_trained_on(tmp_path):
    """THINGS-EEG2: the recording names the training and the unseen test concepts; a probe fitted on the training
    split answers among the training concepts only, so chance on the validation images is 1 / training concepts."""
    root = make_twin(tmp_path / "t", format="things-eeg", classes=4, test_classes=3, images_per_class=10, subjects=1,
                     layout="17x100", image_size=16, train_repetitions=1, test_repetitions=2, seed=3)
    ds = load_splits(load_config(root / "config.yaml").data, image_mode="none")
    assert ds["train"].num_classes == 7  # the recording's concepts: 4 training + 3 test
    res = probe_datasets(ds["train"], ds["val"], sampling_rate(ds["train"].recording))
    assert res.chance == pytest.approx(1 / 4) and res.n_classes == 4


@pytest.fixture(scope="module")
def probe_twin(tmp_path_factory):
    return make_twin(tmp_path_factory.mktemp("probe") / "d", format="eeg-imagenet", classes=8, images_per_class=30,
                     subjects=2, channels=16, image_size=16, seed=11)


def test_band_power_probe_beats_chance_and_fails_on_shuffled_labels(probe_twin):
    ds = load_splits(load_config(probe_twin / "config.yaml").data, image_mode="none")
    sf = sampling_rate(ds["train"].recording)
    held = ds["test"]
    real = probe_datasets(ds["train"], held, sf)
    shuffled = probe_datasets(ds["train"], held, sf, shuffle_labels=True)
    assert real.chance == pytest.approx(1 / 8)
    assert real.n_test >= 40
    assert real.accuracy >= 3 * real.chance, real  # learnable
    assert real.accuracy < 0.98, real  # not trivial
    assert shuffled.accuracy <= 2 * real.chance, shuffled  # no leak through the features


def test_lower_snr_is_harder(tmp_path):
    accs = []
    for snr in (0.15, 1.5):
        root = make_twin(tmp_path / f"s{snr}", format="eeg-imagenet", classes=6, images_per_class=20, subjects=1,
                         channels=12, image_size=16, seed=2, snr=snr)
        ds = load_splits(load_config(root / "config.yaml").data, image_mode="none")
        held = ds["test"]
        accs.append(probe_datasets(ds["train"], held, 1000.0).accuracy)
    assert accs[0] < accs[1]


# ---------------------------------------------------------------------------------------------
# The family of twins: ways of carrying class information in the EEG, image families


def _time_domain_accuracy(ds) -> float:
    """A linear decoder of the time course (10-sample means): what an ERP-style decoder sees."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def xy(split):
        rec, X, Y = split.recording, [], []
        for j in split.indices:
            x = rec.segment(int(j)).numpy()
            T = x.shape[1] // 10 * 10
            X.append(x[:, :T].reshape(x.shape[0], -1, 10).mean(-1).ravel())
            Y.append(int(rec.labels[int(j)]))
        return np.array(X), np.array(Y)

    (xtr, ytr), (xte, yte) = xy(ds["train"]), xy(ds["test"])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000)).fit(xtr, ytr)
    return float(clf.score(xte, yte))


@pytest.fixture(scope="module")
def coded_twins(tmp_path_factory):
    root = tmp_path_factory.mktemp("codes")
    out = {}
    for code in ("sources", "bandpower", "erp"):
        d = make_twin(root / code, format="eeg-imagenet", classes=8, images_per_class=30, subjects=2, channels=16,
                      image_size=16, seed=11, eeg_code=code)
        out[code] = load_splits(load_config(d / "config.yaml").data, image_mode="none")
    return out


def test_each_eeg_code_carries_the_class_in_its_own_way(coded_twins):
    """sources: seen by both decoders; bandpower: only by band power (random phase per trial), erp: mostly in the
    time course. Measured (8 classes, chance 0.125): band power 0.91 / 0.96 / 0.30, time domain 0.85 / 0.13 / 0.94."""
    acc = {}
    for code, ds in coded_twins.items():
        sf = sampling_rate(ds["train"].recording)
        acc[code] = (probe_datasets(ds["train"], ds["test"], sf).accuracy, _time_domain_accuracy(ds))
    chance = 1 / 8
    assert min(acc["sources"]) >= 4 * chance, acc
    assert acc["bandpower"][0] >= 4 * chance and acc["bandpower"][1] <= 2 * chance, acc
    assert acc["erp"][1] >= 4 * chance and acc["erp"][0] < acc["erp"][1] - 0.3, acc


def test_an_unknown_eeg_code_is_one_config_error(tmp_path, run_cli):
    from conftest import assert_one_line_error

    res = run_cli("data", "synth", tmp_path / "t", "--set", "synth.eeg_code=alpha")
    assert_one_line_error(res, "synth.eeg_code", "alpha")


@pytest.mark.parametrize("family", ["glyphs", "cluttered"])
def test_image_families_are_deterministic_and_the_class_sets_the_look(tmp_path, family):
    from PIL import Image

    kw = dict(format="eeg-imagenet", classes=5, images_per_class=10, subjects=1, channels=4, image_size=32, seed=4,
              images=family)
    a, b = digest(make_twin(tmp_path / "a", **kw)), digest(make_twin(tmp_path / "b", **kw))
    assert a == b
    plain = digest(make_twin(tmp_path / "o", **{**kw, "images": "objects"}))
    jpegs = [k for k in a if k.endswith(".JPEG")]
    assert jpegs and all(a[k] != plain[k] for k in jpegs)  # another family draws other pictures
    attrs = json.loads((tmp_path / "a" / "attributes.json").read_text())
    caps = json.loads((tmp_path / "a" / "captions.json").read_text())
    looks = {}
    for stem, at in attrs.items():
        assert at["shape"] in caps[stem] and at["colour"] in caps[stem]
        looks.setdefault(at["label"], set()).add((at["shape"], at["colour"]))
    assert all(len(v) == 1 for v in looks.values()) and len({next(iter(v)) for v in looks.values()}) == 5
    # images of one class are closer to their class mean than to other classes' means (the class shapes the picture)
    by_class: dict[int, list[np.ndarray]] = {}
    for p in (tmp_path / "a" / "images").rglob("*.JPEG"):
        by_class.setdefault(attrs[p.stem]["label"], []).append(np.asarray(Image.open(p), dtype=np.float64) / 255)
    means = {c: np.mean(v, 0) for c, v in by_class.items()}
    hits = [min(means, key=lambda c: np.abs(x - means[c]).mean()) == lab for lab, v in by_class.items() for x in v]
    assert np.mean(hits) >= 0.8, np.mean(hits)


def test_family_members_are_named_presets(tmp_path, run_cli):
    from neuroimagen.data.synthetic import TWIN_FAMILY

    assert {m.get("eeg_code", "sources") for m in TWIN_FAMILY.values()} == {"sources", "bandpower", "erp"}
    assert {m.get("images", "objects") for m in TWIN_FAMILY.values()} == {"objects", "glyphs", "cluttered"}
    res = run_cli("data", "synth", tmp_path / "t", "--member", "erp-glyphs", "--images-per-class", "10", "--channels", "4",
                  "--subjects", "1", "--image-size", "16", "--quiet")
    assert res.code == 0, res
    synth = load_config(tmp_path / "t" / "config.yaml").synth
    assert (synth.eeg_code, synth.images, synth.classes, synth.seed, synth.images_per_class) == ("erp", "glyphs", 8, 202, 10)
