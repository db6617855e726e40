"""The synthetic twin: deterministic per seed, real layouts, learnable but not trivial."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_EEG_IMAGENET, TINY_THINGS, make_twin
from neuroimagen.config import load_config
from neuroimagen.data.datasets import load_splits
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
    K, n = TINY_THINGS["classes"], TINY_THINGS["images_per_class"]
    assert d["preprocessed_eeg_data"].shape == (K * n, 4, 17, 100)
    assert len(d["ch_names"]) == 17 and len(d["times"]) == 100
    t = np.load(things_twin / "sub-02" / "preprocessed_eeg_test.npy", allow_pickle=True).item()
    assert t["preprocessed_eeg_data"].shape == (K, TINY_THINGS["test_repetitions"], 17, 100)
    folders = sorted(p.name for p in (things_twin / "image_set" / "training_images").iterdir())
    assert folders[0] == "00001_sorrel" and len(folders) == K


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
