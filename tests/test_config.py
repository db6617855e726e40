"""Strict config loading: every mistake is one error naming its dotted key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from conftest import REPO
from neuroimagen.config import Config, DataConfig, dump_config, load_config, write_config
from neuroimagen.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "tune_spaces").glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_yaml_loads_strictly(path):
    if path.parent.name == "tune_spaces":
        from neuroimagen.runs.sweeps import load_space

        space, cfg = load_space(path)  # a search space: its keys, distributions and base config, strictly
        assert space.params and isinstance(cfg, Config)
        return
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_shipped_configs_exist():
    names = {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert {"quick.yaml", "eeg_imagenet.yaml", "things_eeg.yaml"} <= names


def test_defaults_without_file():
    cfg = load_config()
    assert cfg.data.format == "eeg-imagenet"
    assert cfg.data.resolved_window() == (20, 460)
    assert DataConfig(format="things-eeg").resolved_window() is None


def test_unknown_key_names_dotted_path_and_suggests(tmp_path):
    p = write(tmp_path, "data:\n  formt: eeg-imagenet\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: data.formt: unknown key (did you mean 'format'?)"


def test_wrong_type_message(tmp_path):
    p = write(tmp_path, "data:\n  split_num: abc\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: data.split_num: expected integer >= 0, got 'abc'"


def test_float_field_rejects_text_and_accepts_yaml_exponent(tmp_path):
    p = write(tmp_path, "synth:\n  snr: abc\n")
    with pytest.raises(ConfigError, match=r"synth.snr: expected float > 0, got 'abc'"):
        load_config(p)
    # PyYAML reads 1e-1 (no dot) as a string: a float field must still take it.
    assert load_config(write(tmp_path, "synth:\n  snr: 1e-1\n", "d.yaml")).synth.snr == pytest.approx(0.1)


@pytest.mark.parametrize("text, fragment", [
    ("data:\n  format: edf\n", "data.format: expected one of 'eeg-imagenet', 'things-eeg', got 'edf'"),
    ("synth:\n  classes: 41\n", "synth.classes: expected integer >= 2 and <= 40, got 41"),
    ("synth:\n  classes: true\n", "synth.classes: expected integer >= 2 and <= 40, got True"),
    ("data:\n  window: [20]\n", "data.window: expected a list of 2 integers or null, got list"),
    ("data:\n  window: [100, 20]\n", "data.window: expected [start, stop) with 0 <= start < stop"),
    ("data:\n  min_length: 700\n", "data.min_length: expected <= data.max_length (600), got 700"),
    ("data:\n  subjects: [1, 1]\n", "data.subjects: expected distinct subject ids"),
    ("data:\n  subjects: [a]\n", "data.subjects[0]: expected integer, got 'a'"),
    ("data: 3\n", "data: expected a mapping, got 3"),
    ("data:\n  format: things-eeg\n  splits: x.pth\n", "data.splits: not used by things-eeg"),
    ("synth:\n  snr: .nan\n", "synth.snr: expected float > 0, got nan"),
    ("eval:\n  variants: [L+I, chance]\n", "eval.variants: variant 'chance' was renamed 'other-class'"),
])
def test_impossible_values(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_names_file_and_line(tmp_path):
    p = write(tmp_path, "data:\n  format: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{p}: invalid YAML at line \d+"):
        load_config(p)
    with pytest.raises(ConfigError, match="expected a YAML mapping at the top level, got list"):
        load_config(write(tmp_path, "- 1\n- 2\n", "l.yaml"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_set_overrides(tmp_path):
    cfg = load_config(None, ["data.split_num=2", "data.subjects=[1, 3]", "synth.snr=0.5", "data.window=null"])
    assert cfg.data.split_num == 2 and cfg.data.subjects == (1, 3) and cfg.synth.snr == 0.5
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.split_nm=1"])
    assert str(e.value) == "--set data.split_nm=1: data.split_nm: unknown key (did you mean 'split_num'?)"
    with pytest.raises(ConfigError, match=r"--set data.split_num=abc: data.split_num: expected integer >= 0, got 'abc'"):
        load_config(None, ["data.split_num=abc"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["data.split_num"])
    with pytest.raises(ConfigError, match="data.format is not a section"):
        load_config(None, ["data.format.x=1"])


def test_relative_paths_resolve_against_the_file(tmp_path, monkeypatch):
    sub = tmp_path / "cfgdir"
    sub.mkdir()
    p = write(sub, "data:\n  eeg: data/eeg.pth\n  images: /abs/images\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(p)
    assert cfg.data.eeg == str((sub / "data" / "eeg.pth").resolve())
    assert cfg.data.images == "/abs/images"
    cfg = load_config(p, ["data.splits=rel/splits.pth"])  # --set: relative to the working directory
    assert cfg.data.splits == str((tmp_path / "rel" / "splits.pth").resolve())


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.subjects=[2]", "data.window=[10, 400]", "seed=7"])
    path = write_config(cfg, tmp_path / "run")
    assert path.name == "config.yaml"
    again = load_config(path)
    assert again == cfg
    assert "partial" not in " ".join(p.name for p in (tmp_path / "run").iterdir())
    assert dump_config(again) == dump_config(cfg)


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize("build, message", [
    (lambda c: c.Config(seed=-5), "seed: expected integer >= 0, got -5"),
    (lambda c: c.EncoderStageConfig(lr=0), "stages.encoder.lr: expected float > 0, got 0"),
    (lambda c: c.TrainConfig(backend="slurm"), "train.backend: expected one of 'ray', 'local', got 'slurm'"),
    (lambda c: c.EvalConfig(variants=("I", "nope")), "eval.variants: unknown variant 'nope'"),
    (lambda c: dataclasses.replace(c.Config(), stages=3), "stages: expected a mapping, got 3"),
    (lambda c: dataclasses.replace(c.Config().stages.semantic, width=0), "stages.semantic.width: expected integer >= 1"),
])
def test_sections_built_in_code_are_checked_like_yaml(build, message):
    """Config objects validate when constructed in code or by dataclasses.replace, with the YAML's messages."""
    import neuroimagen.config as c

    with pytest.raises(ConfigError, match=re.escape(message)):
        build(c)


def test_sections_built_in_code_take_yaml_values():
    from neuroimagen.config import Config, EncoderStageConfig, EvalConfig, load_config

    enc = EncoderStageConfig(lr=1, name="channelnet")
    assert enc.lr == 1.0 and type(enc.lr) is float
    assert EvalConfig(variants=["I", "L+I"]).variants == ("I", "L+I")  # a list becomes a tuple, as from YAML
    assert Config() == load_config(None)
