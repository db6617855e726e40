"""THINGS-EEG2 reader: shapes from the file, image order, validation split, bad inputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_THINGS, make_twin
from neuroimagen.config import Config, from_dict, load_config
from neuroimagen.data.datasets import load_recording, load_splits
from neuroimagen.errors import ConfigError, DataError


def cfg_for(root: Path, **kw):
    return dataclasses.replace(load_config(root / "config.yaml").data, **kw)


def test_items_and_splits(things_twin):
    ds = load_splits(cfg_for(things_twin))
    K, n, Kt = TINY_THINGS["classes"], TINY_THINGS["images_per_class"], TINY_THINGS["test_classes"]
    P = TINY_THINGS["subjects"]
    assert len(ds["train"]) == P * K * (n - 1) and len(ds["val"]) == P * K and len(ds["test"]) == P * Kt
    item = ds["test"][0]
    assert item["eeg"].shape == (17, 100) and item["eeg"].dtype == torch.float32
    assert item["image"].shape == (3, 32, 32)
    # rows follow sorted image order: the item's stem names its concept, and the label's name matches
    rec = ds["train"].recording
    for split in ("train", "val", "test"):
        for j in ds[split].indices[:5]:
            concept = rec.class_names[rec.labels[j]].replace(" ", "_")
            assert rec.stems[j].startswith(concept + "_")
            assert Path(rec.image_paths[j]).parent.name.endswith(concept)
    # validation = held-out training images (split by image, never by trial)
    assert not set(ds["train"].stems) & set(ds["val"].stems)
    assert all(s.endswith("s") for s in ds["test"].stems)
    # zero-shot: the test labels are the test concepts, after the training ones, and none has a training image
    seen = set(rec.labels[ds["train"].indices].tolist()) | set(rec.labels[ds["val"].indices].tolist())
    test_labels = set(rec.labels[ds["test"].indices].tolist())
    assert seen == set(range(K)) and test_labels == set(range(K, K + Kt)) and len(rec.class_names) == K + Kt


def test_repetitions_kept_or_averaged(things_twin):
    avg = load_recording(cfg_for(things_twin), check_images=False)
    P, Kt = TINY_THINGS["subjects"], TINY_THINGS["test_classes"]
    assert len(avg.splits["test"]) == P * Kt  # test repetitions averaged by default: one segment per image and subject
    sep = load_recording(cfg_for(things_twin, things_average_repetitions=False), check_images=False)
    assert len(sep.splits["train"]) == TINY_THINGS["train_repetitions"] * len(avg.splits["train"])
    assert len(sep.splits["test"]) == len(avg.splits["test"])  # the training setting leaves the test split alone
    each = load_recording(cfg_for(things_twin, test_repetitions="each"), check_images=False)
    assert len(each.splits["test"]) == TINY_THINGS["test_repetitions"] * len(avg.splits["test"])
    assert len(each.splits["train"]) == len(avg.splits["train"])
    assert "test repetitions averaged" in avg.notes[0] and "kept as separate segments" in each.notes[0]
    raw = np.load(things_twin / "sub-01" / "preprocessed_eeg_test.npy", allow_pickle=True).item()["preprocessed_eeg_data"]
    j = int(avg.splits["test"][0])
    assert np.allclose(avg.segment(j).numpy(), raw[0].mean(0), atol=1e-5)
    first = [int(i) for i in each.splits["test"][:TINY_THINGS["test_repetitions"]]]
    assert all(np.allclose(each.segment(i).numpy(), raw[0, r]) for r, i in enumerate(first))


def test_test_repetitions_setting_is_checked():
    assert from_dict(Config, {"data": {"format": "things-eeg"}}).data.test_repetitions == "average"
    with pytest.raises(ConfigError, match="data.test_repetitions: expected one of 'average', 'each', got 'mean'"):
        from_dict(Config, {"data": {"format": "things-eeg", "test_repetitions": "mean"}})


def test_shapes_are_read_from_the_file(tmp_path):
    root = make_twin(tmp_path / "t63", **{**TINY_THINGS, "layout": "63x250", "classes": 2, "test_classes": 2,
                                          "subjects": 1})
    ds = load_splits(cfg_for(root), image_mode="none")
    assert ds["train"][0]["eeg"].shape == (63, 250)
    ds = load_splits(cfg_for(root, window=(50, 150)), image_mode="none")
    assert ds["train"][0]["eeg"].shape == (63, 100)


def test_subject_selection(things_twin):
    rec = load_recording(cfg_for(things_twin, subjects=(2,)), check_images=False)
    assert set(rec.subjects.tolist()) == {2}
    with pytest.raises(DataError, match=r"data.subjects: subject 7 not in"):
        load_recording(cfg_for(things_twin, subjects=(7,)), check_images=False)


@pytest.fixture
def things_copy(things_twin, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(things_twin, dst)
    return dst


def test_bad_things_files(things_copy):
    f = things_copy / "sub-01" / "preprocessed_eeg_training.npy"
    obj = np.load(f, allow_pickle=True).item()
    cfg = cfg_for(things_copy)

    def expect(fragment):
        with pytest.raises(DataError) as e:
            load_recording(cfg, check_images=False)
        assert fragment in str(e.value), str(e.value)

    np.save(f, {**obj, "preprocessed_eeg_data": obj["preprocessed_eeg_data"][:, 0]}, allow_pickle=True)
    expect("expected 4-D [images, repetitions, channels, time], got shape")
    np.save(f, {k: v for k, v in obj.items() if k != "ch_names"}, allow_pickle=True)
    expect("missing key 'ch_names'")
    data = obj["preprocessed_eeg_data"].copy()
    data[3, 0, 0, 0] = np.nan
    np.save(f, {**obj, "preprocessed_eeg_data": data}, allow_pickle=True)
    expect("'preprocessed_eeg_data'[3] contains NaN or Inf")
    np.save(f, {**obj, "preprocessed_eeg_data": obj["preprocessed_eeg_data"][:-1]}, allow_pickle=True)
    expect("EEG rows but 40 images")
    np.save(f, np.zeros(3), allow_pickle=True)
    expect("expected a pickled dict")
    f.write_bytes(b"\x93NUMPY garbage")
    expect("cannot read as a .npy dict")


def test_missing_images_dir(things_copy):
    with pytest.raises(DataError, match="data.images: not set"):
        load_recording(cfg_for(things_copy, images=None), check_images=False)
    with pytest.raises(DataError, match=r"training_images: not a directory"):
        load_recording(cfg_for(things_copy, images=str(things_copy / "nope")), check_images=False)
