"""The CLI end to end: synth + inspect round trips, one-line errors, nothing written on failure."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import assert_one_line_error


@pytest.mark.parametrize("fmt, extra", [("eeg-imagenet", []), ("things-eeg", ["--layout", "17x100", "--test-classes", 2])])
def test_synth_then_inspect_round_trip(tmp_path, run_cli, fmt, extra):
    out = tmp_path / "twin"
    res = run_cli("data", "synth", out, "--format", fmt, "--classes", 3, "--images-per-class", 10, "--subjects", 2,
                  *(["--channels", 6] if fmt == "eeg-imagenet" else []), "--image-size", 16, "--seed", 4, "--quiet", *extra)
    assert res.code == 0, res
    assert f"to {out}" in res.out
    if fmt == "things-eeg":
        assert "3 training + 2 test concepts" in res.out and "17 x 100" in res.out
    target = out / "eeg_14_70_std.pth" if fmt == "eeg-imagenet" else out
    res = run_cli("data", "inspect", target, "--json", "--out", tmp_path / "insp",
                  *(["--images", out / "images"] if fmt == "eeg-imagenet" else []))
    assert res.code == 0, res
    report = json.loads(res.out)
    assert report["format"] == fmt and report["problems"] == []
    if fmt == "eeg-imagenet":
        assert report["segments"] == 3 * 10 * 2 and report["channels"] == 6 and report["classes"] == 3
        assert report["subjects"] == {"1": 30, "2": 30}
        assert report["images"]["missing"] == 0
        assert report["splits"]["semantics"] == "all" and len(report["splits"]["per_split"]) == 6
        assert report["length_filter"]["too_long"] == report["segments"] - report["length_filter"]["kept"]
    else:
        assert report["subjects"]["sub-02"]["test"]["repetitions"] == 8
        assert report["images"]["training"]["images"] == 30 and report["images"]["test"]["images"] == 2
        assert report["images"]["concepts_in_both"] == 0  # zero-shot: disjoint test concepts
    assert json.loads((tmp_path / "insp" / "inspect.json").read_text()) == report
    assert (tmp_path / "insp" / "config.yaml").is_file()
    # the human-readable form ends with the problem list
    res = run_cli("data", "inspect", target)
    assert res.code == 0 and res.out.rstrip().endswith("problems: none")


def test_synth_uses_config_and_set(tmp_path, run_cli):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("synth:\n  classes: 2\n  images_per_class: 10\n  subjects: 1\n  channels: 4\n  image_size: 16\n")
    res = run_cli("data", "synth", tmp_path / "t", "--config", cfg, "--set", "synth.channels=5", "--quiet")
    assert res.code == 0, res
    obj = torch.load(tmp_path / "t" / "eeg_5_95_std.pth", weights_only=True)
    assert obj["dataset"][0]["eeg"].shape[0] == 5 and len(obj["labels"]) == 2


def test_inspect_reports_problems_with_exit_1(tmp_path, run_cli, twin):
    copy = tmp_path / "t"
    shutil.copytree(twin, copy)
    sp = torch.load(copy / "block_splits_by_image_all.pth", weights_only=True)
    sp["splits"][1]["val"].append(sp["splits"][1]["train"][0])  # leak one image
    torch.save(sp, copy / "block_splits_by_image_all.pth")
    next((copy / "images").rglob("*.JPEG")).unlink()
    res = run_cli("data", "inspect", copy / "eeg_5_95_std.pth", "--images", copy / "images")
    assert res.code == 1, res
    assert "splits[1]: 1 images in two splits" in res.out
    assert "1 of 60 images missing" in res.out


@pytest.mark.parametrize("args, fragments", [
    (["data", "synth", "{tmp}/o", "--classes", "99"], ["synth.classes: expected integer >= 2 and <= 40, got 99"]),
    (["data", "synth", "{tmp}/o", "--set", "synth.bogus=1"], ["--set synth.bogus=1: synth.bogus: unknown key"]),
    (["data", "synth", "{tmp}/o", "--config", "{tmp}/missing.yaml"], ["missing.yaml: config file not found"]),
    (["data", "synth", "{tmp}/o", "--config", "{tmp}/bad.yaml"], ["bad.yaml: invalid YAML at line"]),
    (["data", "synth", "{tmp}/o", "--classes", "x"], ["'x' is not a valid integer"]),
    (["data", "inspect", "{tmp}/nothing.pth"], ["nothing.pth: not found"]),
    (["data", "inspect", "{tmp}/garbage.pth"], ["cannot read as a torch-saved file"]),
    (["data", "inspect", "{tmp}"], ["no EEG-ImageNet .pth file and no THINGS-EEG2 sub-XX/ folders"]),
    (["config", "show", "--set", "data.format=edf"], ["data.format: expected one of"]),
    (["nosuchcommand"], ["No such command 'nosuchcommand'"]),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, run_cli, args, fragments):
    (tmp_path / "bad.yaml").write_text("synth: [\n")
    (tmp_path / "garbage.pth").write_bytes(b"\x00\x01 not a torch file")
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert_one_line_error(res, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no partial files


def test_synth_refuses_a_non_empty_out_and_overwrites_only_its_own_twin(tmp_path, run_cli):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["data", "synth", out, "--classes", 2, "--images-per-class", 10, "--subjects", 1, "--channels", 4,
            "--image-size", 16, "--quiet"]
    assert_one_line_error(run_cli(*args), "directory exists and is not empty", "not written by neuroimagen")
    assert_one_line_error(run_cli(*args, "--overwrite"), "refusing to overwrite", "not written by neuroimagen")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert run_cli(*args).code == 0
    assert_one_line_error(run_cli(*args), "directory exists and is not empty", "--overwrite")
    res = run_cli(*args, "--overwrite")
    assert res.code == 0, res
    assert (out / "config.yaml").is_file()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_unwritable_output_is_one_clear_error(tmp_path, run_cli):
    import os

    if os.geteuid() == 0:  # root ignores permissions; use a path under a regular file instead
        blocker = tmp_path / "file"
        blocker.write_text("x")
        target = blocker / "out"
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target = ro / "out"
    res = run_cli("data", "synth", target, "--classes", 2, "--images-per-class", 10, "--quiet")
    assert_one_line_error(res, str(target), "cannot write")


def test_config_show_and_keys(run_cli, tmp_path):
    res = run_cli("config", "show", "--set", "data.split_num=3")
    assert res.code == 0 and "split_num: 3" in res.out
    res = run_cli("config", "keys")
    assert res.code == 0 and "data.split_semantics" in res.out and "synth.snr" in res.out


def test_help_lists_the_commands(run_cli):
    res = run_cli("--help")
    assert res.code == 0
    for cmd in ("data", "demo", "config"):
        assert cmd in res.out
    res = run_cli("data", "synth", "--help")
    assert "--images-per-class" in res.out and "--config" in res.out and "--set" in res.out


def test_demo_member_settings_sit_between_the_preset_and_the_users_set(tmp_path, run_cli):
    from neuroimagen.config import load_config, override
    from neuroimagen.data.synthetic import TWIN_FAMILY
    from neuroimagen.runs.demo import QUICK, demo_overrides

    sets = demo_overrides(True, 0, "bandpower-objects", ["synth.subjects=2"])
    assert sets[: len(QUICK)] == QUICK and sets[-1] == "synth.subjects=2"
    synth = override(load_config(None), sets).synth
    member = TWIN_FAMILY["bandpower-objects"]
    assert (synth.eeg_code, synth.classes, synth.images_per_class, synth.seed) == (
        "bandpower", member["classes"], member["images_per_class"], member["seed"])
    assert synth.subjects == 2 and synth.channels == 16  # the user's --set wins; the preset fills the rest
    assert demo_overrides(True, 5, None) == QUICK + ["synth.seed=5"]
    res = run_cli("demo", "--quick", "--member", "nope", "--out", tmp_path / "run")
    assert_one_line_error(res, "demo --member", "unknown member 'nope'", "bandpower-objects")
    assert not (tmp_path / "run").exists()


def test_the_things_demo_preset_is_a_valid_things_twin_of_seen_parts(tmp_path, run_cli):
    """``demo --dataset things-eeg``: the THINGS-EEG2 layout (17 x 100) on top of the quick preset, every shape and
    colour of the twin among the training concepts (so each test concept is an unseen pair of seen parts)."""
    from neuroimagen.config import load_config, override
    from neuroimagen.data.synthetic import COLOURS, SHAPES, class_look
    from neuroimagen.runs.demo import QUICK, THINGS_QUICK, demo_overrides

    sets = demo_overrides(True, 0, None, ["synth.subjects=3"], dataset="things-eeg")
    assert sets[: len(QUICK) + len(THINGS_QUICK)] == QUICK + THINGS_QUICK and sets[-1] == "synth.subjects=3"
    cfg = override(load_config(None), sets)
    cfg.synth.validate("synth")
    s = cfg.synth
    assert (cfg.data.format, s.format, s.shape(), s.subjects) == ("things-eeg", "things-eeg", (17, 100), 3)
    for full in (True, False):
        s = override(load_config(None), demo_overrides(full, 0, dataset="things-eeg")).synth
        train = {class_look(c) for c in range(s.classes)}
        test = {class_look(c) for c in range(s.classes, s.classes + s.test_classes)}
        assert {a for a, _ in train} == set(SHAPES) and {b for _, b in train} == set(COLOURS) and not train & test
    res = run_cli("demo", "--quick", "--dataset", "things", "--out", tmp_path / "run")
    assert res.code == 2 and "things-eeg" in res.err and not (tmp_path / "run").exists()
