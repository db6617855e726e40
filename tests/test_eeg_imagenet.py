"""EEG-ImageNet reader: the released layout, both split semantics, filters, and every bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from neuroimagen.config import DataConfig, load_config
from neuroimagen.data.datasets import load_recording, load_splits
from neuroimagen.data.eeg_imagenet import EEGImageNetFile
from neuroimagen.data.imagenet_classes import CLASS_NAMES, EEG_IMAGENET_WNIDS
from neuroimagen.errors import DataError

VARIANTS = ["eeg_5_95_std.pth", "eeg_14_70_std.pth", "eeg_55_95_std.pth", "eeg_signals_raw_with_mean_std.pth"]


def cfg_for(twin: Path, **kw) -> DataConfig:
    base = load_config(twin / "config.yaml").data
    return dataclasses.replace(base, **kw)


def test_items_follow_the_contract(twin):
    ds = load_splits(cfg_for(twin))
    assert set(ds) == {"train", "val", "test"}
    item = ds["train"][0]
    assert set(item) == {"eeg", "label", "subject", "stem", "index", "image"}
    assert item["eeg"].shape == (8, 440) and item["eeg"].dtype == torch.float32
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert isinstance(item["label"], int) and isinstance(item["subject"], int) and isinstance(item["stem"], str)
    # the image of an item is the file <images>/<wnid>/<stem>.JPEG whose wnid is the label's
    rec = ds["train"].recording
    wnid = item["stem"].split("_")[0]
    assert rec.class_ids[item["label"]] == wnid
    assert rec.image_paths[item["index"]].endswith(f"/{wnid}/{item['stem']}.JPEG")
    assert rec.label_captions()[item["label"]] == f"An image of {CLASS_NAMES[wnid]}"


def test_image_modes(twin):
    ds = load_splits(cfg_for(twin), image_mode="path")
    assert Path(ds["val"][0]["image"]).is_file()
    ds = load_splits(cfg_for(twin), image_mode="none")
    assert "image" not in ds["test"][0]


def test_splits_are_by_image_and_disjoint(twin):
    ds = load_splits(cfg_for(twin), image_mode="none")
    stems = {k: set(v.stems) for k, v in ds.items()}
    assert not (stems["train"] & stems["val"]) and not (stems["train"] & stems["test"]) and not (stems["val"] & stems["test"])
    assert len(ds["train"]) > 3 * len(ds["test"]) > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_all_four_variants_read(twin, variant):
    rec = load_recording(cfg_for(twin, eeg=str(twin / variant)), check_images=False)
    x = torch.stack([rec.segment(int(j)) for j in rec.splits["train"]])
    # _std files are standardised; the raw one is z-scored with its own means/stddevs.
    assert abs(float(x.mean())) < 0.2 and 0.6 < float(x.std()) < 1.4
    if variant.startswith("eeg_signals_raw"):
        assert rec.norm is not None
        raw = rec.segments[int(rec.splits["train"][0])]
        assert float(raw.abs().mean()) > 5.0  # unnormalised on disk


def test_single_and_all_semantics_select_the_same_segments(twin):
    all_ = load_recording(cfg_for(twin, subjects=(2,)), check_images=False)
    single = load_recording(cfg_for(twin, subjects=(2,), splits=str(twin / "block_splits_by_image_single.pth")),
                            check_images=False)
    for name in ("train", "val", "test"):
        assert np.array_equal(all_.splits[name], single.splits[name])
        assert set(all_.subjects[all_.splits[name]].tolist()) == {2}


def test_subject_selection_and_unknown_subject(twin):
    rec = load_recording(cfg_for(twin, subjects=(1,)), check_images=False)
    assert set(rec.subjects[np.concatenate(list(rec.splits.values()))].tolist()) == {1}
    with pytest.raises(DataError, match=r"data.subjects: subject 9 not in .* \(has subjects \[1, 2\]\)"):
        load_recording(cfg_for(twin, subjects=(9,)), check_images=False)


def test_over_long_segments_are_filtered(twin):
    f = EEGImageNetFile(twin / "eeg_5_95_std.pth", CLASS_NAMES)
    assert (f.lengths > 600).any(), "the twin writes a few over-long segments"
    rec = load_recording(cfg_for(twin), check_images=False)
    used = np.concatenate(list(rec.splits.values()))
    assert (f.lengths[used] <= 600).all() and (f.lengths[used] >= 460).all()


# ----------------------------------------------------------------------------------------------
# Hand-made files: exact filter semantics and each bad input


def make_files(tmp_path: Path, lengths=(500, 500, 500, 500), eeg=None, labels=None, images=None,
               splits=None, extra=None, dataset=None, name="eeg_5_95_std.pth", split_name="block_splits_by_image_all.pth"):
    """Write a minimal EEG-ImageNet layout (4 images, one subject) and return its DataConfig."""
    wnids = list(EEG_IMAGENET_WNIDS[:2]) if labels is None else labels
    stems = [f"{wnids[0]}_1", f"{wnids[0]}_2", f"{wnids[1]}_3", f"{wnids[1]}_4"] if images is None else images
    if dataset is None:
        dataset = [{"eeg": (eeg[i] if eeg is not None else torch.randn(4, T)), "image": i, "label": i // 2, "subject": 1}
                   for i, T in enumerate(lengths)]
    torch.save({"dataset": dataset, "labels": wnids, "images": stems, **(extra or {})}, tmp_path / name)
    sp = splits if splits is not None else {"splits": [{"train": [0, 2], "val": [1], "test": [3]}]}
    torch.save(sp, tmp_path / split_name)
    img_root = tmp_path / "images"
    from PIL import Image

    for s in stems:
        if "/" in s or ".." in s:
            continue
        (img_root / s.split("_")[0]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (200, 10, 10)).save(img_root / s.split("_")[0] / f"{s}.JPEG")
    return DataConfig(eeg=str(tmp_path / name), splits=str(tmp_path / split_name), images=str(img_root), image_size=16)


def test_length_filter_keeps_window_filling_segments_only(tmp_path):
    # 455 passes the public '450 <= T' test but cannot fill [20:460]; 600 is kept; 601 is not.
    cfg = make_files(tmp_path, lengths=(455, 460, 600, 601),
                     splits={"splits": [{"train": [0, 1], "val": [2], "test": [3]}]})
    rec = load_recording(cfg)
    assert rec.splits["train"].tolist() == [1] and rec.splits["val"].tolist() == [2] and rec.splits["test"].tolist() == []
    ds = rec.dataset("train", image_size=16)
    assert ds[0]["eeg"].shape == (4, 440) and ds[0]["image"].shape == (3, 16, 16)
    # the window and bounds are configurable
    rec = load_recording(dataclasses.replace(cfg, window=(0, 300), min_length=300, max_length=700))
    assert rec.splits["train"].tolist() == [0, 1] and rec.splits["test"].tolist() == [3]


def test_raw_variant_is_z_scored_with_its_statistics(tmp_path):
    x = [torch.full((4, 500), 10.0) + torch.arange(4.0)[:, None] for _ in range(4)]
    cfg = make_files(tmp_path, eeg=x, name="eeg_signals_raw_with_mean_std.pth",
                     extra={"means": torch.tensor([10.0, 11.0, 12.0, 13.0]), "stddevs": torch.full((4,), 2.0)})
    rec = load_recording(cfg)
    assert torch.allclose(rec.segment(0), torch.zeros(4, 440))
    cfg = make_files(tmp_path, eeg=x, name="eeg_signals_raw_with_mean_std.pth",
                     extra={"means": torch.zeros(4, 1), "stddevs": torch.full((4, 1), 2.0)})
    assert torch.allclose(load_recording(cfg).segment(0)[:, 0], (torch.arange(4.0) + 10) / 2)


def test_leakage_is_an_error(tmp_path):
    cfg = make_files(tmp_path, splits={"splits": [{"train": [0, 1], "val": [1], "test": [3]}]})
    with pytest.raises(DataError, match=r"image '.*_2' is in both 'train' and 'val' \(1 leaking images; splits must be by image\)"):
        load_recording(cfg)


def bad(tmp_path, fragment, **kw):
    cfg = make_files(tmp_path, **kw) if kw.get("_cfg") is None else kw["_cfg"]
    with pytest.raises(DataError) as e:
        load_recording(cfg)
    msg = str(e.value)
    assert fragment in msg, msg
    assert "\n" not in msg
    return msg


def test_truncated_file(tmp_path):
    cfg = make_files(tmp_path)
    data = Path(cfg.eeg).read_bytes()
    Path(cfg.eeg).write_bytes(data[: len(data) // 2])
    msg = bad(tmp_path, "cannot read as a torch-saved file", _cfg=cfg)
    assert msg.startswith(f"data.eeg: {cfg.eeg}: ")


def test_not_a_torch_file_and_non_dict(tmp_path):
    cfg = make_files(tmp_path)
    Path(cfg.eeg).write_text("hello")
    bad(tmp_path, "cannot read as a torch-saved file", _cfg=cfg)
    torch.save([1, 2, 3], cfg.eeg)
    bad(tmp_path, "expected a dict at the top level, got list", _cfg=cfg)


def test_pickled_objects_are_refused(tmp_path):
    cfg = make_files(tmp_path)

    import argparse

    # any object outside the weights_only allow-list must be refused, never rebuilt
    torch.save({"dataset": argparse.Namespace(x=1), "labels": [], "images": []}, cfg.eeg)
    bad(tmp_path, "cannot read as a torch-saved file", _cfg=cfg)


def test_missing_file(tmp_path):
    cfg = make_files(tmp_path)
    bad(tmp_path, "file not found", _cfg=dataclasses.replace(cfg, eeg=str(tmp_path / "nope.pth")))


@pytest.mark.parametrize("kw, fragment", [
    (dict(dataset=[{"eeg": torch.randn(4, 500), "image": 0, "label": 0}]), "dataset[0]: missing key 'subject'"),
    (dict(dataset=[{"eeg": torch.randn(500), "image": 0, "label": 0, "subject": 1}]),
     "dataset[0]['eeg']: expected a 2-D tensor (channels, time), got shape (500,)"),
    (dict(dataset=[{"eeg": torch.randn(1, 4, 500), "image": 0, "label": 0, "subject": 1}]), "expected a 2-D tensor"),
    (dict(dataset=[{"eeg": torch.zeros(4, 500, dtype=torch.int64), "image": 0, "label": 0, "subject": 1}]),
     "expected a float tensor"),
    (dict(dataset=[{"eeg": torch.randn(4, 500), "image": 7, "label": 0, "subject": 1}]),
     "dataset[0]['image']: expected an integer in [0, 4), got 7"),
    (dict(dataset=[{"eeg": torch.randn(4, 500), "image": 0, "label": -1, "subject": 1}]),
     "dataset[0]['label']: expected an integer in [0, 2), got -1"),
    (dict(labels=["n00000000", EEG_IMAGENET_WNIDS[1]]), "labels[0]: unknown WordNet id 'n00000000'"),
    (dict(images=["../../etc/passwd", "a_1", "b_2", "c_3"]), "images[0]: invalid image stem '../../etc/passwd'"),
    (dict(splits={"splits": [{"train": [0, 99], "val": [1], "test": [3]}]}),
     "['train']: index 99 out of range for 4 segments"),
    (dict(splits={"splits": [{"train": [0], "val": [1]}]}), "splits[0]: missing key 'test'"),
    (dict(splits={"nope": []}), "missing key 'splits'"),
])
def test_bad_inputs(tmp_path, kw, fragment):
    bad(tmp_path, fragment, **kw)


def test_missing_keys(tmp_path):
    cfg = make_files(tmp_path)
    torch.save({"dataset": [], "labels": []}, cfg.eeg)
    bad(tmp_path, "missing key 'images' (expected 'dataset', 'labels', 'images')", _cfg=cfg)


def test_nan_in_eeg(tmp_path):
    x = [torch.randn(4, 500) for _ in range(4)]
    x[2][1, 30] = float("nan")
    bad(tmp_path, "dataset[2]['eeg'] contains NaN or Inf", eeg=x)
    x[2][1, 30] = float("inf")
    bad(tmp_path, "contains NaN or Inf", eeg=x)


def test_missing_image_files(tmp_path):
    cfg = make_files(tmp_path)
    victim = next(Path(cfg.images).rglob("*.JPEG"))
    victim.unlink()
    bad(tmp_path, f"data.images: 1 of 4 image files missing, e.g. {victim}", _cfg=cfg)


def test_split_semantics_must_be_known(tmp_path):
    cfg = make_files(tmp_path, split_name="my_splits.pth")
    bad(tmp_path, "set data.split_semantics to 'all' or 'single'", _cfg=cfg)
    assert len(load_recording(dataclasses.replace(cfg, split_semantics="all")).splits["train"]) == 2


def test_split_num_out_of_range(tmp_path):
    cfg = make_files(tmp_path)
    bad(tmp_path, "data.split_num: 3 out of range", _cfg=dataclasses.replace(cfg, split_num=3))


def test_extra_class_table(tmp_path):
    (tmp_path / "names.yaml").write_text("n00000001: gizmo\n")
    cfg = make_files(tmp_path, labels=["n00000001", EEG_IMAGENET_WNIDS[0]],
                     images=["n00000001_1", "n00000001_2", f"{EEG_IMAGENET_WNIDS[0]}_3", f"{EEG_IMAGENET_WNIDS[0]}_4"])
    rec = load_recording(dataclasses.replace(cfg, class_names=str(tmp_path / "names.yaml")))
    assert rec.class_names[0] == "gizmo" and rec.label_captions()[0] == "An image of gizmo"
