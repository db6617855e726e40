"""Fuzzing the readers and the config loader: every bad input is one clear error, nothing else.

Each example mutates a real file written by the synthetic twin (or a YAML config / ``--set`` string),
runs it through what a user calls (``neuroimagen data inspect``, ``neuroimagen config show``,
``load_recording`` / ``load_splits``) and checks the contract of DESIGN principle 13:

- an invalid input ends in exit code 2 and one line ``neuroimagen: error: ...`` naming the file or key
  (``data inspect`` lists content problems with exit code 1); the library raises a
  ``neuroimagen.errors`` exception with a one-line message; a valid mutation succeeds;
- no traceback and no other exception type;
- nothing is written: the data folders and the working directory keep their entries, sizes and
  mtimes, and no file is opened for writing;
- no file outside the data roots is opened (an audit hook sees every ``open``), in particular not the
  sentinel image that a ``../`` stem would reach;
- no example hangs (SIGALRM bounds each one).

A mutation is a plain tuple (``('seg_index', 7, 'image', ('over', 0))``) applied to the twin's files,
so a regression is one ``@example(...)`` line. Examples are derandomised and no database is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import REPO, assert_one_line_error, make_twin
from neuroimagen.config import Config, DataConfig, describe_fields, dump_config, load_config
from neuroimagen.data.datasets import load_recording, load_splits
from neuroimagen.data.imagenet_classes import CLASS_NAMES
from neuroimagen.errors import ConfigError, DataError, NeuroimagenError


# A sparse EEG tensor is one of the mutations; torch warns while validating it on load.
pytestmark = pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants:UserWarning")


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


EXAMPLE_SECONDS = 30  # far above any example here (< 1 s); only a hang reaches it
EEG_FILE, RAW_FILE, SPLIT_FILE = "eeg_5_95_std.pth", "eeg_signals_raw_with_mean_std.pth", "block_splits_by_image_all.pth"
THINGS_TRAIN = "preprocessed_eeg_training.npy"


# ----------------------------------------------------------------------------------------------
# The guard around one example: no writes, no reads outside the data roots, no hang


class ExampleTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so that no reader's ``except Exception`` can swallow it."""


_AUDIT: dict = {"thread": None, "opens": []}


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _AUDIT["thread"] == threading.get_ident():
        _AUDIT["opens"].append(args)


_HOOKED: list = []


def _install_audit_hook() -> None:
    if not _HOOKED:  # an audit hook cannot be removed: install one per process, active only in guard()
        sys.addaudithook(_audit)
        _HOOKED.append(True)


def _code_roots() -> list[str]:
    """Where the interpreter, installed packages and neuroimagen's own modules live (lazy imports)."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(REPO / "neuroimagen"), "/dev/null"}
    roots.update(p for p in sys.path if p and os.path.isdir(p) and ("site-packages" in p or p.endswith("lib-dynload")))
    return [os.path.realpath(r) for r in roots]


def _within(path: str, roots) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def snapshot(*roots: Path) -> dict:
    """Every entry under ``roots``: (type, size, mtime_ns); a write, delete or new file changes it."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [".", *dirnames, *filenames]:
                p = os.path.normpath(os.path.join(dirpath, name))
                s = os.lstat(p)
                out[p] = (stat.S_IFMT(s.st_mode), s.st_size if not stat.S_ISDIR(s.st_mode) else 0, s.st_mtime_ns)
    return out


def _is_write(args: tuple) -> bool:
    mode, flags = (args + (None, None))[1:3]
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))


@contextlib.contextmanager
def guard(data_roots, cwd: Path, forbidden=()):
    """Run the body in ``cwd`` with the checks of the module docstring; ``forbidden`` must never be opened."""
    _install_audit_hook()
    roots = [Path(r) for r in data_roots] + [cwd]
    before = snapshot(*roots)
    allowed = [os.path.realpath(r) for r in roots] + _code_roots()
    old_cwd = os.getcwd()
    os.chdir(cwd)
    timed = threading.current_thread() is threading.main_thread()

    def on_alarm(signum, frame):  # noqa: ARG001
        raise ExampleTimeout(f"example still running after {EXAMPLE_SECONDS} s")

    if timed:
        old_handler = signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(EXAMPLE_SECONDS)
    _AUDIT["opens"], _AUDIT["thread"] = [], threading.get_ident()
    try:
        yield
    finally:
        _AUDIT["thread"] = None
        if timed:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old_handler)
        os.chdir(old_cwd)
    opens = [a for a in _AUDIT["opens"] if isinstance(a[0], (str, bytes, os.PathLike))]
    writes = [a for a in opens if _is_write(a)]
    assert not writes, f"opened for writing: {writes}"
    paths = [os.path.realpath(os.fsdecode(os.path.join(cwd, os.fsdecode(a[0])))) for a in opens]
    outside = [p for p in paths if not _within(p, allowed)]
    assert not outside, f"opened outside the data roots: {outside}"
    hit = [p for p in paths if _within(p, [os.path.realpath(f) for f in forbidden])]
    assert not hit, f"opened the sentinel: {hit}"
    assert snapshot(*roots) == before, "a data folder or the working directory changed"


def expect_cli(res, expect: str, *fragments: str) -> None:
    """``expect``: 'error' (exit 2, one line), 'problems' (inspect: exit 1, listed), 'ok' or 'any'."""
    assert "Traceback" not in res.err and "Traceback" not in res.out, res
    if expect == "error" or (expect == "any" and res.code == 2):
        assert_one_line_error(res, *(fragments if expect == "error" else ()))
    elif expect == "problems" or (expect == "any" and res.code == 1):
        assert res.code == 1 and res.err == "" and ("problems (" in res.out or '"problems": [\n' in res.out), res
        assert all(f in res.out for f in fragments), (fragments, res.out[-800:])
    else:
        assert res.code == 0 and res.err == "", res


def library_outcome(fn) -> str | None:
    """None when ``fn()`` succeeds; the message of the project error it raised otherwise."""
    try:
        fn()
    except NeuroimagenError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        return msg
    return None


def use_splits(cfg: DataConfig, image_kind: str | None = None) -> None:
    """Read every split and fetch items (images included), as a training stage would."""
    for ds in load_splits(cfg, image_mode="tensor").values():
        for i in sorted({0, len(ds) - 1}) if len(ds) else ():
            item = ds[i]
            assert torch.isfinite(item["eeg"]).all() and item["eeg"].shape[0] >= 1 and item["eeg"].shape[1] >= 1
        ds.eeg_tensor()
        if image_kind is not None:
            ds.captions(image_kind)


class Files(dict):
    """A module fixture's parsed files; the short repr keeps hypothesis' failure reports readable."""

    def __repr__(self) -> str:
        return f"Files({self['base']})"


def example_dir(tmp_path: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix="ex-", dir=tmp_path))


# ----------------------------------------------------------------------------------------------
# Tiny twins, written once for this module (read-only) and their parsed contents


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A tiny EEG-ImageNet twin (2 classes x 10 images x 2 subjects, 4 channels), a sentinel outside its
    image root where ``../secret`` would lead, and the parsed EEG and split files."""
    base = tmp_path_factory.mktemp("fuzz") / "twin"
    make_twin(base, format="eeg-imagenet", classes=2, images_per_class=10, subjects=2, channels=4,
              image_size=16, seed=11)
    (base / "secret").mkdir()
    from PIL import Image

    Image.new("RGB", (16, 16)).save(base / "secret.JPEG")  # images/../secret/../secret.JPEG
    Image.new("RGB", (16, 16)).save(base / "secret" / "secret.JPEG")
    for p in base.rglob("*"):
        os.utime(p, ns=(10**18, 10**18))  # fixed mtimes: an accidental touch is visible in the snapshot
    return Files({
        "base": base,
        "images": base / "images",
        "sentinels": [base / "secret.JPEG", base / "secret" / "secret.JPEG"],
        "eeg": torch.load(base / EEG_FILE, weights_only=True),
        "raw": torch.load(base / RAW_FILE, weights_only=True),
        "splits": torch.load(base / SPLIT_FILE, weights_only=True),
        "eeg_bytes": (base / EEG_FILE).read_bytes(),
        "split_bytes": (base / SPLIT_FILE).read_bytes(),
    })


@pytest.fixture(scope="module")
def mini_things(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz") / "things"
    make_twin(base, format="things-eeg", classes=2, images_per_class=10, subjects=1, channels=4, times=16,
              image_size=16, test_repetitions=2, seed=12)
    return Files({
        "base": base,
        "images": base / "image_set",
        "train": np.load(base / "sub-01" / THINGS_TRAIN, allow_pickle=True).item(),
        "train_bytes": (base / "sub-01" / THINGS_TRAIN).read_bytes(),
    })


# ----------------------------------------------------------------------------------------------
# Strategies: junk values, bad indices, bad stems


def junk(allow_lists: bool = True, allow_dicts: bool = True):
    """Values of the wrong type for almost any field: never an int, a list of ints or a list of strings."""
    base = [st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
            st.binary(min_size=1, max_size=6), st.just(torch.tensor(1.5)), st.just(torch.zeros(2, 2, dtype=torch.int64))]
    if allow_dicts:
        base.append(st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
    if allow_lists:
        base.append(st.lists(st.one_of(st.floats(), st.none(), st.binary(min_size=1, max_size=2)), min_size=1, max_size=3))
    return st.one_of(*base)


# An index spec resolved against a bound ``hi`` at apply time: ('neg', k) -> -1 - k, ('over', k) -> hi + k,
# ('raw', v) -> v (a non-integer).
offset = st.one_of(st.integers(min_value=0, max_value=2**80), st.sampled_from([2**31, 2**63, 2**64, 2**100]))
bad_index = st.one_of(
    st.tuples(st.just("neg"), offset),
    st.tuples(st.just("over"), offset),
    st.tuples(st.just("raw"), st.one_of(st.booleans(), st.floats(allow_nan=True), st.text(max_size=4), st.none(),
                                        st.just(torch.tensor(0)), st.lists(st.integers(0, 3), max_size=2))),
)


# A top-level object that is not a dict (bytes would be written as the file itself).
not_a_dict = st.one_of(junk(allow_dicts=False).filter(lambda v: not isinstance(v, bytes)), st.lists(st.integers(), max_size=3))


def resolve_index(spec, hi: int):
    kind, v = spec
    return -1 - v if kind == "neg" else hi + v if kind == "over" else v


ODD_TEXT = ["", " ", "\x00", "\n", "\r\n", "\t", "\u202e", "\u200b", "\ufeff", "\udcff", "\ud800", "é", "日本",
            "🧠", "\x1b[2J", "%s", "{0}", "'", '"', "\\", "~", "-", "=", ":", "#", "&a", "*a", "!!int", "null"]
odd_text = st.one_of(st.sampled_from(ODD_TEXT), st.text(max_size=8),
                     st.lists(st.sampled_from(ODD_TEXT), min_size=1, max_size=3).map("".join))

# Stems that would leave <images>/<wnid>/ or are not file names: every one must be refused.
ESCAPING_STEMS = ["../secret", "../../secret", "/etc/passwd", "n02389026_1/../../secret", "..", ".", "",
                  "n02389026_1\\..\\..\\secret", "n02389026_1\x00", "n02389026_1\n", "\nn02389026_1",
                  "n02389026_1 ", "~/x", "C:\\x", "n02389026_1\u2215x", "n02389026_１", "n02389026_1/"]
escaping_stem = st.one_of(
    st.sampled_from(ESCAPING_STEMS),
    st.tuples(st.sampled_from(["n02389026_1", "", "a"]), st.sampled_from(["/", "\\", "\x00", "..", "\n", "/../"]),
              odd_text).map("".join),
)


# ----------------------------------------------------------------------------------------------
# EEG-ImageNet file mutations


def _seg_pos(obj, pos: int) -> int:
    return pos % len(obj["dataset"])


def apply_eeg(m: dict, mutation: tuple, raw: bool = False):
    """(payload, expectation, fragments) for one mutation of the twin's EEG file.

    The payload is bytes or an object to ``torch.save``; the expectation is 'error', 'problems'
    (inspect lists it, a load may or may not reach it) or 'any'.
    """
    kind, *a = mutation
    base = m["raw"] if raw else m["eeg"]
    obj = dict(base)
    obj["dataset"] = list(base["dataset"])
    n_img, n_lab = len(base["images"]), len(base["labels"])
    if kind == "truncate":
        data = m["eeg_bytes"]
        return data[: int(a[0] * len(data))], "error", ["cannot read as a torch-saved file"]
    if kind == "flip":
        data = bytearray(m["eeg_bytes"])
        data[a[0] % len(data)] ^= a[1]
        return bytes(data), "any", []
    if kind == "top":
        return a[0], "error", ["expected a dict at the top level"]
    if kind == "drop":
        del obj[a[0]]
        return obj, "error", [f"missing key '{a[0]}'"]
    if kind == "field":
        key, value = a
        obj[key] = value
        return obj, "error", []
    if kind == "empty":
        obj[a[0]] = []
        return obj, "error", []
    i = _seg_pos(obj, a[0]) if kind.startswith("seg") else None
    seg = dict(obj["dataset"][i]) if i is not None else None
    if kind == "seg_nondict":
        obj["dataset"][i] = a[1]
        return obj, "error", [f"dataset[{i}]: expected a dict"]
    if kind == "seg_drop":
        del seg[a[1]]
        obj["dataset"][i] = seg
        return obj, "error", [f"dataset[{i}]: missing key '{a[1]}'"]
    if kind == "seg_index":
        key = a[1]
        hi = {"image": n_img, "label": n_lab, "subject": 2**63}[key]
        v = resolve_index(a[2], hi)
        seg[key] = v
        obj["dataset"][i] = seg
        return obj, "error", [f"dataset[{i}]['{key}']"]
    if kind == "seg_subject":  # any non-negative int64 subject id is a valid (if unusual) id
        seg["subject"] = a[1]
        obj["dataset"][i] = seg
        return obj, "any", []
    if kind == "seg_eeg":
        x = seg["eeg"]
        C, T = x.shape
        how = a[1]
        expect, frag = "error", [f"dataset[{i}]['eeg']"]
        if how in ("int64", "int16", "uint8", "bool", "complex64"):
            x = x.to(getattr(torch, how))
        elif how in ("float16", "float64", "bfloat16"):
            x, expect, frag = x.to(getattr(torch, how)), "any", []
        elif how == "rank0":
            x = x[0, 0]
        elif how == "rank1":
            x = x[0]
        elif how == "rank3":
            x = x[None]
        elif how == "channels":
            x, frag = torch.cat([x, x[:1]], 0), [f"dataset[{i}]"]  # dataset[0] sets the channel count
        elif how == "no_channels":
            x = x[:0]
        elif how == "no_time":
            x, expect, frag = x[:, :0], "any", []  # T = 0 is filtered by the length bounds
        elif how == "transposed":
            x, frag = x.t().contiguous(), [f"dataset[{i}]"]
        elif how == "sparse":
            x = x.to_sparse()
        elif how == "list":
            x = x.tolist()
        elif how == "none":
            x = None
        elif how in ("nan", "inf", "-inf"):
            x = x.clone()
            x.view(-1)[a[2] % (C * T)] = float(how)
            expect, frag = "problems", ["contain NaN/Inf", f"dataset[{i}]"]
        elif how == "huge":
            x, expect, frag = torch.sign(x) * 3e38, "any", []  # finite, but sums overflow to Inf
        seg["eeg"] = x
        obj["dataset"][i] = seg
        return obj, expect, frag
    if kind == "stem":
        k = a[0] % n_img
        obj["images"] = list(base["images"])
        obj["images"][k] = a[1]
        return obj, a[2], [f"images[{k}]", "invalid image stem"] if a[2] == "error" else []
    if kind == "label":
        k = a[0] % n_lab
        obj["labels"] = list(base["labels"])
        obj["labels"][k] = a[1]
        return obj, "error", [f"labels[{k}]"]
    if kind == "norm":  # raw file only
        name, how = a[0], a[1]
        C = base["dataset"][0]["eeg"].shape[0]
        expect = "error"
        if how == "drop":
            del obj[name]
        elif how == "nan":
            v = obj[name].clone()
            v[a[2] % C] = float("nan")
            obj[name] = v
        elif how == "zero" and name == "stddevs":
            v = obj[name].clone()
            v[a[2] % C] = 0.0
            obj[name] = v
        elif how == "shape":
            obj[name] = torch.ones(tuple(a[3]))
            shape = tuple(a[3])
            ok = shape in ((), (1,), (C,), (C, 1)) or (len(shape) == 2 and shape[0] == C and shape[1] >= 460)
            # (C, T) with 1 < T < 460 is well-formed but too short for the window: only a load fails
            short = len(shape) == 2 and shape[0] == C and 1 < shape[1] < 460
            expect = "any" if ok else "load_error" if short else "error"
        elif how == "junk":
            obj[name], expect = a[3], "any"  # scalars and lists are valid statistics; anything else an error
        else:
            expect = "any"
        return obj, expect, [f"'{name}'"] if expect in ("error", "load_error") and how != "drop" else []
    raise AssertionError(mutation)


eeg_mutation = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 0.999)),
    st.tuples(st.just("flip"), st.integers(0, 10**7), st.integers(1, 255)),
    st.tuples(st.just("top"), st.one_of(not_a_dict, st.just(torch.zeros(2)))),
    st.tuples(st.just("drop"), st.sampled_from(["dataset", "labels", "images"])),
    st.tuples(st.just("field"), st.sampled_from(["dataset", "labels", "images"]), junk()),
    st.tuples(st.just("empty"), st.sampled_from(["dataset", "labels"])),
    st.tuples(st.just("seg_nondict"), st.integers(0, 10**6), junk(allow_dicts=False)),
    st.tuples(st.just("seg_drop"), st.integers(0, 10**6), st.sampled_from(["eeg", "image", "label", "subject"])),
    st.tuples(st.just("seg_index"), st.integers(0, 10**6), st.sampled_from(["image", "label", "subject"]), bad_index),
    st.tuples(st.just("seg_subject"), st.integers(0, 10**6), st.integers(0, 2**63 - 1)),
    st.tuples(st.just("seg_eeg"), st.integers(0, 10**6),
              st.sampled_from(["int64", "int16", "uint8", "bool", "complex64", "float16", "float64", "bfloat16",
                               "rank0", "rank1", "rank3", "channels", "no_channels", "no_time", "transposed",
                               "sparse", "list", "none", "nan", "inf", "-inf", "huge"]),
              st.integers(0, 10**6)),
    st.tuples(st.just("stem"), st.integers(0, 10**6), escaping_stem, st.just("error")),
    st.tuples(st.just("stem"), st.integers(0, 10**6), odd_text, st.just("any")),
    st.tuples(st.just("label"), st.integers(0, 10**6), odd_text.filter(lambda s: s not in CLASS_NAMES)),
)


def write_payload(path: Path, payload) -> None:
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)


TWIN_FILE = object()  # "write the twin's own file", as opposed to any payload (None included)


def run_eeg_example(m, tmp_path, run_cli, payload, expect, fragments, name=EEG_FILE, split_payload=TWIN_FILE,
                    load_expect=None, captions=None):
    """Write the example's files, then inspect (CLI) and load (library) them under the guard."""
    ex = example_dir(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    try:
        write_payload(ex / name, payload)
        write_payload(ex / SPLIT_FILE, m["split_bytes"] if split_payload is TWIN_FILE else split_payload)
        if captions is not None:
            (ex / "captions.json").write_bytes(captions)
        cfg = DataConfig(eeg=str(ex / name), splits=str(ex / SPLIT_FILE), images=str(m["images"]), image_size=16,
                         captions=str(ex / "captions.json") if captions is not None else None)
        with guard([ex, m["base"]], cwd, forbidden=m["sentinels"]):
            res = run_cli("data", "inspect", ex / name, "--images", m["images"])
            msg = library_outcome(lambda: use_splits(cfg, "image" if captions is not None else None))
        if expect == "load_error":  # well-formed for inspect, unusable for a load
            expect, load_expect = "ok", "error"
        expect_cli(res, expect, *fragments)
        load_expect = load_expect or ("error" if expect == "error" else "any")
        if load_expect == "error":
            assert msg is not None, "load succeeded on an invalid file"
            for f in fragments:
                assert f in msg, (f, msg)
        if msg is not None and (expect == "error" or load_expect == "error"):
            assert msg.startswith(("data.eeg: ", "data.splits: ", f"{ex}")), msg
        if res.code == 2:
            assert str(ex) in res.err, res  # the error names the file
        return res, msg
    finally:
        shutil.rmtree(ex, ignore_errors=True)


@fuzz(300)
@given(mutation=eeg_mutation)
@example(mutation=("seg_index", 3, "subject", ("over", 0)))  # subject 2**63: does not fit int64
@example(mutation=("seg_eeg", 5, "no_channels", 0))
@example(mutation=("seg_eeg", 5, "sparse", 0))
@example(mutation=("stem", 2, "../secret", "error"))
@example(mutation=("stem", 2, "n02389026_1\n", "error"))
@example(mutation=("truncate", 0.0))
def test_eeg_imagenet_file(mini, tmp_path, run_cli, mutation):
    payload, expect, fragments = apply_eeg(mini, mutation)
    run_eeg_example(mini, tmp_path, run_cli, payload, expect, fragments)


norm_name, norm_k = st.sampled_from(["means", "stddevs"]), st.integers(0, 100)
norm_mutation = st.one_of(
    st.tuples(st.just("norm"), norm_name, st.sampled_from(["drop", "nan", "zero"]), norm_k, st.none()),
    st.tuples(st.just("norm"), norm_name, st.just("shape"), norm_k,
              st.one_of(st.lists(st.integers(0, 5), max_size=3), st.lists(st.sampled_from([4, 1, 0, 460, 600]), max_size=2))),
    st.tuples(st.just("norm"), norm_name, st.just("junk"), norm_k, junk()),
)


@fuzz(60)
@given(mutation=norm_mutation)
@example(mutation=("norm", "means", "shape", 0, [4, 0]))  # (C, 0): no sample to normalise with
@example(mutation=("norm", "stddevs", "shape", 0, [4, 0]))
@example(mutation=("norm", "means", "shape", 0, [4, 460]))  # per-sample means, per-channel stddevs
@example(mutation=("norm", "stddevs", "shape", 0, [4, 100]))  # per-sample stddevs shorter than the window
def test_eeg_imagenet_raw_statistics(mini, tmp_path, run_cli, mutation):
    kind, name, how, k, extra = mutation
    payload, expect, fragments = apply_eeg(mini, (kind, name, how, k, extra), raw=True)
    run_eeg_example(mini, tmp_path, run_cli, payload, expect, fragments, name=RAW_FILE)


# ----------------------------------------------------------------------------------------------
# Split file mutations


def apply_splits(m: dict, mutation: tuple):
    """(payload, inspect expectation, load expectation, fragments) for one mutation of the split file."""
    kind, *a = mutation
    base = m["splits"]
    splits = [dict(s) for s in base["splits"]]
    n = len(m["eeg"]["dataset"])
    if kind == "truncate":
        data = m["split_bytes"]
        return data[: int(a[0] * len(data))], "error", "error", ["cannot read as a torch-saved file"]
    if kind == "top":
        return a[0], "error", "error", ["expected a dict at the top level"]
    if kind == "no_splits":
        return {"splitz": splits}, "error", "error", ["missing key 'splits'"]
    if kind == "splits_value":
        return {"splits": a[0]}, "error", "error", ["splits"]
    k = a[0] % len(splits)
    if kind == "entry_nondict":
        splits[k] = a[1]
        return {"splits": splits}, "error", "error", [f"splits[{k}]"]
    if kind == "entry_drop":
        del splits[k][a[1]]
        return {"splits": splits}, "error", "error", [f"splits[{k}]: missing key '{a[1]}'"]
    name = a[1]
    if kind == "indices":
        splits[k][name] = a[2]
        ok = isinstance(a[2], torch.Tensor) and not a[2].is_floating_point() and a[2].dim() == 1 and a[2].dtype != torch.bool
        expect = "any" if ok else "error"
        return {"splits": splits}, expect, expect, [] if ok else [f"splits[{k}]['{name}']"]
    if kind == "out_of_range":
        v = resolve_index(a[2], n)
        splits[k][name] = list(splits[k][name]) + [v]
        return {"splits": splits}, "problems", ("error" if k == 0 else "any"), [f"['{name}']: index {v} out of range"]
    if kind == "leak":
        src, dst = name, a[2]
        if src == dst:
            dst = {"train": "val", "val": "test", "test": "train"}[src]
        victim = splits[k][src][a[3] % len(splits[k][src])]
        splits[k][dst] = list(splits[k][dst]) + [victim]
        stem = m["eeg"]["images"][m["eeg"]["dataset"][victim]["image"]]
        return {"splits": splits}, "problems", ("error" if k == 0 else "any"), [f"'{stem}'"]
    raise AssertionError(mutation)


split_name = st.sampled_from(["train", "val", "test"])
split_mutation = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 0.999)),
    st.tuples(st.just("top"), not_a_dict),
    st.tuples(st.just("no_splits")),
    st.tuples(st.just("splits_value"),
              st.one_of(junk(allow_lists=False), st.just([]), st.lists(st.integers(), min_size=1, max_size=2))),
    st.tuples(st.just("entry_nondict"), st.integers(0, 100), junk()),
    st.tuples(st.just("entry_drop"), st.integers(0, 100), split_name),
    st.tuples(st.just("indices"), st.integers(0, 100), split_name,
              st.one_of(junk(), st.just([1.0]), st.just([True]), st.just([[1, 2]]), st.just(torch.tensor([0.5])),
                        st.just(torch.tensor([[0, 1]])), st.just(torch.tensor([1, 2])), st.just(torch.tensor([True])),
                        st.just(torch.tensor(3)))),
    st.tuples(st.just("out_of_range"), st.integers(0, 100), split_name, bad_index.filter(lambda s: s[0] != "raw")),
    st.tuples(st.just("leak"), st.integers(0, 100), split_name, split_name, st.integers(0, 10**6)),
)


@fuzz(150)
@given(mutation=split_mutation)
@example(mutation=("out_of_range", 0, "train", ("over", 2**70)))  # beyond int64
@example(mutation=("out_of_range", 1, "test", ("neg", 2**70)))
@example(mutation=("leak", 0, "train", "test", 0))
def test_split_file(mini, tmp_path, run_cli, mutation):
    payload, expect, load_expect, fragments = apply_splits(mini, mutation)
    res, msg = run_eeg_example(mini, tmp_path, run_cli, mini["eeg_bytes"], expect, fragments,
                               split_payload=payload, load_expect=load_expect)
    if load_expect == "error":
        assert msg.startswith("data.splits: "), msg


# ----------------------------------------------------------------------------------------------
# Captions


captions_mutation = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 0.999)),
    st.tuples(st.just("json"), st.one_of(
        st.just(b"[" * 100_000), st.just(b"{\"a\": " * 50_000), st.just(b"{\"x\": " + b"9" * 5000 + b"}"),
        st.just(b"\xff\xfe\x00"), st.just(b"{\"x\": \"\\ud800\"}"), st.just(b"NaN"), st.just(b"[]"), st.just(b"null"),
        st.just(b"\"a\""), st.just("{\"x\": \"caf\u00e9\"}".encode("latin-1")),
        st.binary(max_size=20),
    )),
    st.tuples(st.just("value"), st.integers(0, 10**6),
              st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.just(""), st.just("  \n"),
                        st.lists(st.text(max_size=2), max_size=2),
                        st.dictionaries(st.text(max_size=2), st.text(max_size=2), max_size=1))),
    st.tuples(st.just("key"), st.integers(0, 10**6), odd_text),
    st.tuples(st.just("drop"), st.integers(0, 10**6)),
)


def apply_captions(m: dict, mutation: tuple):
    kind, *a = mutation
    text = (m["base"] / "captions.json").read_bytes()
    caps = json.loads(text)
    stems = sorted(caps)
    if kind == "truncate":
        return text[: int(a[0] * len(text))], "error"  # no proper prefix of a JSON object is one
    if kind == "json":
        return a[0], "any"
    s = stems[a[0] % len(stems)] if kind != "key" else None
    if kind == "value":
        caps[s] = a[1]
        return json.dumps(caps).encode(), "error"
    if kind == "key":
        caps[a[1]] = "a caption"
        return json.dumps(caps).encode(), "ok"
    if kind == "drop":
        del caps[s]
        return json.dumps(caps).encode(), "any"  # missing caption: an error only when the stem is used
    raise AssertionError(mutation)


@fuzz(60)
@given(mutation=captions_mutation)
@example(mutation=("json", b"[" * 100_000))  # nesting deeper than the recursion limit
@example(mutation=("json", b"{\"x\": " + b"9" * 5000 + b"}"))  # an integer beyond int()'s digit limit
def test_captions_file(mini, tmp_path, run_cli, mutation):
    payload, expect = apply_captions(mini, mutation)
    res, msg = run_eeg_example(mini, tmp_path, run_cli, mini["eeg_bytes"], "ok", [], captions=payload)
    if expect == "error":
        assert msg is not None and "captions" in msg, msg
    if expect == "ok":
        assert msg is None, msg
    if msg is not None:
        assert "captions" in msg, msg


# ----------------------------------------------------------------------------------------------
# The user's class-name table (data.class_names, YAML or JSON)


@fuzz(40)
@given(text=st.deferred(lambda: st.one_of(  # deferred: NASTY_YAML is defined with the config cases below
    st.sampled_from(sorted(NASTY_YAML)), st.text(max_size=30),
    st.dictionaries(st.one_of(odd_text, st.integers(), st.none()), st.one_of(odd_text, st.integers(), st.none()),
                    max_size=3).map(lambda d: yaml.safe_dump(d, sort_keys=False)))))
@example(text="n00000001: !!int abc\n")
def test_class_names_file(mini, tmp_path, run_cli, text):
    ex = example_dir(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    try:
        (ex / "names.yaml").write_bytes(text.encode("utf-8", "surrogatepass"))
        shutil.copy(mini["base"] / EEG_FILE, ex)
        shutil.copy(mini["base"] / SPLIT_FILE, ex)
        cfg = DataConfig(eeg=str(ex / EEG_FILE), splits=str(ex / SPLIT_FILE), class_names=str(ex / "names.yaml"))
        with guard([ex], cwd):
            msg = library_outcome(lambda: load_recording(cfg, check_images=False))
        assert msg is None or msg.startswith("data.class_names: "), msg
    finally:
        shutil.rmtree(ex, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# THINGS-EEG2 files


def apply_things(t: dict, mutation: tuple):
    """(payload, expectation, fragments) for one mutation of sub-01's training file."""
    kind, *a = mutation
    obj = dict(t["train"])
    data = obj["preprocessed_eeg_data"]
    N, R, C, T = data.shape
    if kind == "truncate":
        raw = t["train_bytes"]
        return raw[: int(a[0] * len(raw))], "error", ["cannot read as a .npy dict"]
    if kind == "top":
        return a[0], "error", []
    if kind == "drop":
        del obj[a[0]]
        return obj, "error", [f"missing key '{a[0]}'"]
    if kind == "data":
        how = a[0]
        expect, frag = "error", ["'preprocessed_eeg_data'"]
        if how in ("int64", "bool", "complex64", "object", "U3"):
            x = data.astype(how)
        elif how in ("float16", "float64"):
            x, expect, frag = data.astype(how), "any", []
        elif how == "rank3":
            x = data[:, 0]
        elif how == "rank5":
            x = data[None]
        elif how in ("zero_rep", "zero_chan", "zero_time"):
            x = data[:, :0] if how == "zero_rep" else data[:, :, :0] if how == "zero_chan" else data[..., :0]
            frag = []
        elif how in ("nan", "inf"):
            x = data.copy()
            x.reshape(-1)[a[1] % x.size] = float(how)
        elif how == "huge":  # finite float32, but a float32 mean over repetitions would overflow
            x, expect, frag = (np.sign(data) * 3e38).astype(np.float32), "any", []
        elif how == "fewer_rows":
            x, expect, frag = data[:-1], "problems", ["EEG rows but"]
        elif how == "list":
            x = data.tolist()
        elif how == "scalar":
            x = np.float32(1.0)
        obj["preprocessed_eeg_data"] = x
        return obj, expect, frag
    if kind == "ch_names":
        obj["ch_names"] = a[0]
        return obj, "error", ["'ch_names'"]
    if kind == "times":
        obj["times"] = a[0]
        return obj, "error", ["'times'"]
    raise AssertionError(mutation)


def save_npy(path: Path, payload) -> None:
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        np.save(path, payload, allow_pickle=True)


things_mutation = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 0.999)),
    st.tuples(st.just("top"), st.one_of(junk(), st.just(np.zeros(3)), st.just([1, 2]))),
    st.tuples(st.just("drop"), st.sampled_from(["preprocessed_eeg_data", "ch_names", "times"])),
    st.tuples(st.just("data"), st.sampled_from(["int64", "bool", "complex64", "object", "U3", "float16", "float64",
                                                "rank3", "rank5", "zero_rep", "zero_chan", "zero_time", "nan", "inf",
                                                "huge", "fewer_rows", "list", "scalar"]), st.integers(0, 10**6)),
    st.tuples(st.just("ch_names"), st.one_of(st.none(), st.integers(), st.just("E1E2"), st.just(np.array("E1")),
                                             st.lists(st.text(max_size=3), max_size=6).filter(lambda v: len(v) != 4),
                                             st.just([1, 2, 3, 4]), st.just([b"E1", b"E2", b"E3", b"E4"]),
                                             st.just([["E1"], ["E2", "E3"], "E4", "E5"]), st.just(np.array([["E1", "E2"]] * 2)),
                                             st.just(np.arange(4)))),
    st.tuples(st.just("times"), st.one_of(st.none(), st.just("abc"), st.just(np.zeros((16, 2))), st.just(np.zeros(3)),
                                          st.just(["a"] * 16), st.just([[0.0], [0.0, 1.0]] + [[0.0]] * 14),
                                          st.just(np.zeros(16, dtype=complex)), st.just(np.array(1.0)),
                                          st.just({"a": 1}), st.just([None] * 16))),
)


@fuzz(120)
@given(mutation=things_mutation)
@example(mutation=("ch_names", 5))  # not iterable
@example(mutation=("times", [[0.0], [0.0, 1.0]] + [[0.0]] * 14))  # ragged
@example(mutation=("times", ["a"] * 16))  # not numbers
@example(mutation=("data", "zero_rep", 0))  # no repetitions to average: would be NaN segments
@example(mutation=("ch_names", [1, 2, 3, 4]))  # not names (and not JSON-serialisable as numpy ints)
@example(mutation=("data", "huge", 0))  # averaging repetitions must not overflow to Inf
def test_things_eeg_file(mini_things, tmp_path, run_cli, mutation):
    t = mini_things
    payload, expect, fragments = apply_things(t, mutation)
    ex = example_dir(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    try:
        (ex / "sub-01").mkdir()
        save_npy(ex / "sub-01" / THINGS_TRAIN, payload)
        shutil.copy(t["base"] / "sub-01" / "preprocessed_eeg_test.npy", ex / "sub-01")
        cfg = DataConfig(format="things-eeg", eeg=str(ex), images=str(t["images"]), image_size=16)
        with guard([ex, t["base"]], cwd):
            res = run_cli("data", "inspect", ex, "--images", t["images"], "--json")
            msg = library_outcome(lambda: use_splits(cfg))
        expect_cli(res, expect, *fragments)
        if res.code in (0, 1):
            json.loads(res.out)
        if expect in ("error", "problems"):  # a load stops at any of them
            assert msg is not None and msg.startswith(f"data.eeg: {ex}"), msg
            assert all(f in msg for f in fragments), (fragments, msg)
    finally:
        shutil.rmtree(ex, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Image stems: a '../' stem never reaches a file outside the image root


@pytest.mark.parametrize("stem", ["../secret", "../../twin/secret", "n02389026_1/../../../secret"])
def test_escaping_stem_never_opens_the_sentinel(mini, tmp_path, run_cli, stem):
    obj = dict(mini["eeg"])
    obj["images"] = [stem] + list(obj["images"][1:])
    res, msg = run_eeg_example(mini, tmp_path, run_cli, obj, "error", ["images[0]", "invalid image stem", repr(stem)])
    assert repr(stem) in msg


def test_guard_sees_a_read_outside_the_roots(mini, tmp_path):
    """The guard itself: opening the sentinel, or writing into the working directory, fails it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    with pytest.raises(AssertionError, match="sentinel|outside"):
        with guard([mini["images"]], cwd, forbidden=mini["sentinels"]):
            mini["sentinels"][0].read_bytes()
    with pytest.raises(AssertionError, match="writing"):
        with guard([mini["images"]], cwd):
            (cwd / "x").write_text("x")


# ----------------------------------------------------------------------------------------------
# Config files and --set overrides


def _sections() -> dict:
    """Every config section by dotted name ('' is the top level) -> its dataclass."""
    out = {"": Config}
    todo = [("", Config)]
    while todo:
        prefix, cls = todo.pop()
        for name, tp in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(tp):
                dotted = f"{prefix}.{name}" if prefix else name
                out[dotted] = tp
                todo.append((dotted, tp))
    return out


SECTIONS = _sections()
LEAVES = [row[0] for row in describe_fields()]

yaml_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
              st.floats(allow_nan=True, allow_infinity=True), odd_text, st.just(10**400), st.just(-(10**400)),
              st.just("1e999"), st.just("0x10"), st.just("2024-13-45")),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(odd_text, inner, max_size=2)),
    max_leaves=4,
)

NASTY_YAML = {  # YAML text -> what loading it must give
    "seed: 2024-13-45\n": "error", "seed: !!int abc\n": "error", "seed: !!float x\n": "error",
    "seed: !!binary '@@'\n": "error", "seed: !!python/object/apply:os.system ['true']\n": "error",
    "seed: " + "[" * 600 + "]" * 600 + "\n": "error", "seed: " + "9" * 5000 + "\n": "error",
    "synth:\n  snr: " + "9" * 400 + "\n": "error", "data:\n  eeg: \"a\\0b\"\n": "error",
    "data:\n  images: \"x\\0\"\n": "error", "data: &a\n  x: *a\n": "error", "a: &a [*a]\ndata: {window: *a}\n": "error",
    "\ufeffseed: 1\n": "any", "seed:\t1\n": "any", "? [a, b]\n: 1\n": "error", "%YAML 9.9\n---\nseed: 1\n": "error",
    "--- 1\n--- 2\n": "error", "seed: 1\nseed: 2\n": "any", "data:\n  subjects: [1, 2, \n": "error",
    "seed: .inf\n": "error", "data:\n  window: [0, " + "9" * 30 + "]\n": "error",
    "data:\n  min_length: " + "9" * 30 + "\n  max_length: " + "9" * 31 + "\n": "error", "seed: \"\\ud800\"\n": "error",
    "data:\n  eeg: \"\\udcff\"\n": "any", "\x00": "error", "seed: 1\x00\n": "error",
    "stages:\n  saliency:\n    lr: " + "1" * 400 + "\n": "error",
}


def apply_config(base_text: str, mutation: tuple):
    """(file bytes, expectation, fragments) for one mutation of a valid config file."""
    kind, *a = mutation
    raw = yaml.safe_load(base_text)
    if kind == "unknown":
        section, key = SECTIONS_LIST[a[0] % len(SECTIONS_LIST)], a[1]
        node = raw
        for part in [p for p in section.split(".") if p]:
            node = node.setdefault(part, {})
        node[key] = a[2]
        dotted = f"{section}.{key}" if section else key
        return (yaml.safe_dump(raw, allow_unicode=False, sort_keys=False).encode(), "error",
                ["unknown key"] + ([f"{section}."] if section else []))
    if kind == "leaf":
        dotted = LEAVES[a[0] % len(LEAVES)]
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = a[1]
        return yaml.safe_dump(raw, allow_unicode=True, sort_keys=False).encode("utf-8", "surrogatepass"), "any", []
    if kind == "nasty":
        return a[0].encode("utf-8", "surrogatepass"), NASTY_YAML[a[0]], []
    if kind == "text":
        return a[0].encode("utf-8", "surrogatepass"), "any", []
    if kind == "bytes":
        return a[0], "any", []
    if kind == "cut":
        data = base_text.encode()
        return data[: int(a[0] * len(data))], "any", []
    raise AssertionError(mutation)


SECTIONS_LIST = sorted(SECTIONS)


def _not_known(section_index: int, key) -> bool:
    cls = SECTIONS[SECTIONS_LIST[section_index % len(SECTIONS_LIST)]]
    return key not in {f.name for f in dataclasses.fields(cls)}


config_mutation = st.one_of(
    st.tuples(st.just("unknown"), st.integers(0, 100), st.one_of(odd_text, st.integers(), st.booleans(), st.none()),
              yaml_value).filter(lambda t: _not_known(t[1], t[2])),
    st.tuples(st.just("leaf"), st.integers(0, 10**4), yaml_value),
    st.tuples(st.just("nasty"), st.sampled_from(sorted(NASTY_YAML))),
    st.tuples(st.just("text"), st.text(max_size=40)),
    st.tuples(st.just("bytes"), st.binary(max_size=40)),
    st.tuples(st.just("cut"), st.floats(0, 1)),
)

set_text = st.one_of(
    st.text(max_size=30),
    st.tuples(st.sampled_from(LEAVES), st.sampled_from(["=", "=", " = ", "==", ""]),
              st.one_of(odd_text, st.sampled_from(["2024-13-45", "!!int abc", "[" * 600, "9" * 5000, "9" * 400,
                                                    "a\x00b", "{a: 1}", "[1, 2", "*a", "&a 1", "!!binary x",
                                                    "1e999", ".nan", "-1", "null", "~"]))).map("".join),
    st.tuples(st.sampled_from(SECTIONS_LIST[1:] + ["", ".", "..", "data..eeg"]), st.sampled_from([".", ""]), odd_text,
              st.just("=1")).map("".join),
)


def run_config_example(tmp_path, run_cli, file_bytes, sets, expect, fragments):
    ex = example_dir(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    try:
        cfg_path = ex / "c.yaml"
        if file_bytes is not None:
            cfg_path.write_bytes(file_bytes)
        args = ["config", "show"] + (["--config", cfg_path] if file_bytes is not None else [])
        args += [f"--set={s}" for s in sets]
        result: dict = {}
        with guard([ex], cwd):
            res = run_cli(*args)
            try:
                result["cfg"] = load_config(cfg_path if file_bytes is not None else None, sets)
            except ConfigError as exc:
                result["err"] = str(exc)
        expect_cli(res, expect, *fragments)
        if "err" in result:
            assert result["err"] and "\n" not in result["err"], repr(result["err"])
            assert res.code == 2, res
        else:
            assert res.code == 0, res
            # what `config show` prints is itself a valid config that loads to the same values
            out = ex / "shown.yaml"
            out.write_text(res.out, encoding="utf-8")
            assert load_config(out) == result["cfg"]
            assert dump_config(result["cfg"]) == res.out
        if res.code == 2 and file_bytes is not None and not sets:
            assert str(cfg_path) in res.err, res  # the error names the file
        return res
    finally:
        shutil.rmtree(ex, ignore_errors=True)


@fuzz(200)
@given(mutation=config_mutation)
@example(mutation=("nasty", "seed: 2024-13-45\n"))  # PyYAML raises ValueError building the date
@example(mutation=("nasty", "seed: !!int abc\n"))
@example(mutation=("nasty", "seed: " + "[" * 600 + "]" * 600 + "\n"))  # RecursionError in the composer
@example(mutation=("nasty", "seed: " + "9" * 5000 + "\n"))  # beyond int()'s digit limit
@example(mutation=("nasty", "synth:\n  snr: " + "9" * 400 + "\n"))  # int too large for a float field
@example(mutation=("nasty", "data:\n  eeg: \"a\\0b\"\n"))  # NUL in a path
@example(mutation=("leaf", LEAVES.index("seed"), 2**64))  # does not fit in 64 bits
def test_config_file(tmp_path, run_cli, mutation):
    base = (REPO / "configs" / "quick.yaml").read_text(encoding="utf-8")
    file_bytes, expect, fragments = apply_config(base, mutation)
    run_config_example(tmp_path, run_cli, file_bytes, [], expect, fragments)


@fuzz(150)
@given(sets=st.lists(set_text, min_size=1, max_size=3), with_file=st.booleans())
@example(sets=["seed=2024-13-45"], with_file=False)
@example(sets=["data.eeg=a\x00b"], with_file=False)
@example(sets=["synth.snr=" + "9" * 400], with_file=True)
@example(sets=["data.format=\udcff"], with_file=False)  # a non-UTF-8 argv byte, as Python decodes it
@example(sets=["data.\x1b[2J=1"], with_file=False)  # a terminal escape in a key
@example(sets=["seed=" + "9" * 30], with_file=False)
def test_set_overrides(tmp_path, run_cli, sets, with_file):
    base = (REPO / "configs" / "quick.yaml").read_bytes() if with_file else None
    res = run_config_example(tmp_path, run_cli, base, sets, "any", [])
    if res.code == 2:
        line = res.err.strip()
        assert line.isprintable(), repr(line)  # control characters and lone surrogates are escaped


def test_unknown_key_at_depth_names_the_dotted_path(tmp_path, run_cli):
    text = "stages:\n  saliency:\n    alpha1: 0.1\n    \u00e9t\u00e9: 1\n"
    res = run_config_example(tmp_path, run_cli, text.encode(), [], "error", ["stages.saliency.\u00e9t\u00e9: unknown key"])
    assert "c.yaml" in res.err


# ----------------------------------------------------------------------------------------------
# Regressions found by the fuzzer, as plain library calls


def test_regression_config_loader_errors(tmp_path):
    p = tmp_path / "c.yaml"
    for text, fragment in [
        ("seed: 2024-13-45\n", "invalid YAML"),
        ("seed: !!int abc\n", "invalid YAML"),
        ("seed: " + "[" * 600 + "]" * 600 + "\n", "invalid YAML"),
        ("seed: " + "9" * 5000 + "\n", "invalid YAML"),
        ("synth:\n  snr: " + "9" * 400 + "\n", "synth.snr: expected float > 0"),
        ("data:\n  eeg: \"a\\0b\"\n", "data.eeg: expected a path without NUL characters"),
        ("seed: " + str(2**64) + "\n", "seed: expected integer >= 0, got an integer of 65 bits"),
    ]:
        p.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as e:
            load_config(p)
        assert fragment in str(e.value) and str(e.value).startswith(f"{p}: "), str(e.value)
    for sets, fragment in [(["seed=2024-13-45"], "seed: expected integer >= 0, got '2024-13-45'"),
                           (["data.eeg=a\x00b"], "data.eeg: expected a path without NUL characters"),
                           (["synth.snr=" + "9" * 400], "synth.snr: expected float > 0"),
                           (["data.format=\udcff"], "\\udcff")]:
        with pytest.raises(ConfigError) as e:
            load_config(None, sets)
        assert fragment in str(e.value) and str(e.value).isprintable(), str(e.value)


def test_regression_reader_errors(mini, tmp_path):
    def load(obj=None, splits=None, captions=None, name=EEG_FILE):
        d = example_dir(tmp_path)
        write_payload(d / name, mini["eeg_bytes"] if obj is None else obj)
        write_payload(d / SPLIT_FILE, mini["split_bytes"] if splits is None else splits)
        if captions is not None:
            (d / "c.json").write_bytes(captions)
        cfg = DataConfig(eeg=str(d / name), splits=str(d / SPLIT_FILE), images=str(mini["images"]), image_size=16,
                         captions=str(d / "c.json") if captions is not None else None)
        with pytest.raises(DataError) as e:
            use_splits(cfg)
        return str(e.value)

    def seg(i, **kw):
        obj = dict(mini["eeg"])
        obj["dataset"] = list(obj["dataset"])
        obj["dataset"][i] = {**obj["dataset"][i], **kw}
        return obj

    assert "dataset[3]['subject']: expected a non-negative integer" in load(seg(3, subject=2**63))
    x = mini["eeg"]["dataset"][0]["eeg"]
    assert "dataset[0]['eeg']: expected at least one channel" in load(seg(0, eeg=x[:0]))
    assert "dataset[2]['eeg']: expected a dense" in load(seg(2, eeg=x.to_sparse()))
    images = list(mini["eeg"]["images"])
    images[1] = images[1] + "\n"
    assert "images[1]: invalid image stem" in load({**mini["eeg"], "images": images})
    sp = {"splits": [dict(s) for s in mini["splits"]["splits"]]}
    sp["splits"][0]["train"] = list(sp["splits"][0]["train"]) + [2**70]
    assert f"['train']: index {2**70} out of range" in load(splits=sp)
    raw = {**mini["raw"], "means": torch.ones(4, 0)}
    assert "'means': expected shape" in load(raw, name=RAW_FILE)
    assert "'stddevs' covers 100 samples, fewer than the window stop 460" in load(
        {**mini["raw"], "stddevs": torch.ones(4, 100)}, name=RAW_FILE)
    assert "cannot read captions" in load(captions=b"[" * 100_000)
    assert "cannot read captions" in load(captions=b"{\"x\": " + b"9" * 5000 + b"}")


def test_regression_per_sample_means_with_per_channel_stddevs(mini, tmp_path):
    d = example_dir(tmp_path)
    torch.save({**mini["raw"], "means": torch.zeros(4, 460), "stddevs": torch.full((4,), 2.0)}, d / RAW_FILE)
    shutil.copy(mini["base"] / SPLIT_FILE, d)
    rec = load_recording(DataConfig(eeg=str(d / RAW_FILE), splits=str(d / SPLIT_FILE)), check_images=False)
    j = int(rec.splits["train"][0])
    assert torch.allclose(rec.segment(j), rec.segments[j][:, 20:460] / 2.0)


def test_regression_things_errors(mini_things, tmp_path):
    t = mini_things

    def load(**kw):
        d = example_dir(tmp_path)
        (d / "sub-01").mkdir()
        np.save(d / "sub-01" / THINGS_TRAIN, {**t["train"], **kw}, allow_pickle=True)
        shutil.copy(t["base"] / "sub-01" / "preprocessed_eeg_test.npy", d / "sub-01")
        with pytest.raises(DataError) as e:
            load_recording(DataConfig(format="things-eeg", eeg=str(d), images=str(t["images"])))
        return str(e.value)

    assert "'ch_names': expected a list of 4 channel name strings" in load(ch_names=5)
    assert "'ch_names': expected a list of 4 channel name strings" in load(ch_names=[1, 2, 3, 4])
    assert "'ch_names': expected a list of 4 channel name strings" in load(ch_names=[["E1"], ["E2", "E3"], "E4", "E5"])
    assert "'times': expected 16 sample times" in load(times=[[0.0], [0.0, 1.0]] + [[0.0]] * 14)
    assert "'times': expected 16 sample times" in load(times=["a"] * 16)
    data = t["train"]["preprocessed_eeg_data"]
    assert "expected at least one" in load(preprocessed_eeg_data=data[:, :0])


def test_regression_things_average_of_large_values_stays_finite(mini_things, tmp_path):
    t = mini_things
    d = example_dir(tmp_path)
    (d / "sub-01").mkdir()
    big = (np.sign(t["train"]["preprocessed_eeg_data"]) * 3e38).astype(np.float32)  # finite; a float32 sum is not
    np.save(d / "sub-01" / THINGS_TRAIN, {**t["train"], "preprocessed_eeg_data": big}, allow_pickle=True)
    shutil.copy(t["base"] / "sub-01" / "preprocessed_eeg_test.npy", d / "sub-01")
    rec = load_recording(DataConfig(format="things-eeg", eeg=str(d), images=str(t["images"])))
    assert all(torch.isfinite(rec.segment(int(j))).all() for j in rec.splits["train"])
