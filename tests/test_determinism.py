"""Determinism and what is never unpickled.

- Same config + seed: two independent runs from scratch (twin, stages 1-3, tiny LDM, judge, reconstruction,
  scoring) give the identical metrics table on the CPU; another seed gives another one.
- User files are never unpickled: every ``torch.load`` in the package passes ``weights_only=True``, and the one
  ``allow_pickle=True`` load (THINGS-EEG2's dict-in-.npy format) is confined to one documented function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO
from neuroimagen.config import load_config

# Everything tiny: the point is bit-for-bit equality of two runs, not good numbers.
TINY = ["train.backend=local", "eval.backend=local", "train.progress=false", "train.threads_per_worker=2",
        "synth.classes=4", "synth.images_per_class=10", "synth.subjects=2", "synth.channels=8", "synth.image_size=16",
        "data.image_size=16",
        "stages.encoder.epochs=2", "stages.encoder.embed_dim=8", "stages.encoder.classes_per_batch=4",
        "stages.encoder.samples_per_class=2",
        "stages.saliency.epochs=2", "stages.saliency.resolution=32", "stages.saliency.g_width=8",
        "stages.saliency.d_width=8", "stages.saliency.z_dim=8", "stages.saliency.batch_size=8",
        "stages.semantic.epochs=2", "stages.semantic.embed_dim=8", "stages.semantic.hidden=8",
        "text_encoder.hidden_size=16", "text_encoder.num_layers=1", "text_encoder.max_length=16",
        "ldm.resolution=16", "ldm.vae_channels=[8,16]", "ldm.unet_channels=[8,16]", "ldm.vae_steps=5",
        "ldm.unet_steps=5", "ldm.num_inference_steps=2", "ldm.samples_per_eeg=1",
        "eval.judge_steps=5", "eval.judge_width=4", "eval.trials=5", "eval.is_splits=2", "eval.batch_size=8"]
VARIANTS = ["L+I", "other-class"]


def _ablation(out: Path, extra=()) -> pd.DataFrame:
    from neuroimagen.runs.evaluation import ablation

    ablation(load_config(None, TINY + list(extra)), out, VARIANTS, log=lambda m: None)
    return pd.read_csv(out / "results" / "summary.csv", dtype={"subject": str})


@pytest.mark.slow
def test_same_config_and_seed_give_the_identical_metrics_table(tmp_path):
    a = _ablation(tmp_path / "a")
    b = _ablation(tmp_path / "b")
    assert len(a) == 3 * len(VARIANTS)  # 2 subjects + "all", per variant
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    per_sample = []
    for run in ("a", "b"):  # file paths name their own run directory: compare them relative to it
        df = pd.read_parquet(tmp_path / run / "results" / "per_sample.parquet")
        for col in [c for c in df.columns if df[c].map(lambda v: isinstance(v, str)).any()]:
            df[col] = df[col].map(lambda v, r=str(tmp_path / run): v.replace(r, "<run>") if isinstance(v, str) else v)
        per_sample.append(df)
    assert len(per_sample[0]) > 0
    pd.testing.assert_frame_equal(*per_sample, check_exact=True)
    # and the seed matters: another seed is another run (guards against a table that ignores its inputs)
    c = _ablation(tmp_path / "c", ["seed=1", "synth.seed=1"])
    assert not a[["acc", "ssim"]].equals(c[["acc", "ssim"]])


# ----------------------------------------------------------------------------------------------
# Static checks over the package's source


def _calls(name_attr: str):
    """(file, line, call node) of every call ``<x>.<name_attr>(...)`` in neuroimagen/ and jobs/."""
    for path in sorted((REPO / "neuroimagen").rglob("*.py")) + sorted((REPO / "jobs").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name_attr:
                yield path, node


def _kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value
    return None


def test_every_torch_load_is_weights_only():
    found = 0
    for path, node in _calls("load"):
        if not (isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            continue
        found += 1
        wo = _kw(node, "weights_only")
        assert isinstance(wo, ast.Constant) and wo.value is True, f"{path}:{node.lineno}: torch.load without weights_only=True"
    assert found >= 5  # the scan sees the package's loads (checkpoints, readers, caches, classifiers)


def test_allow_pickle_load_is_confined_to_one_documented_function():
    loads = []
    for path, node in _calls("load"):
        if isinstance(node.func.value, ast.Name) and node.func.value.id == "np":
            ap = _kw(node, "allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                loads.append((path, node.lineno))
    assert len(loads) == 1, loads
    path, line = loads[0]
    assert path.name == "things_eeg.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    owner = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.lineno <= line <= f.end_lineno]
    assert [f.name for f in owner] == ["load_trusted_npy_dict"]
    doc = ast.get_docstring(owner[0]) or ""
    assert "trusted" in doc.lower() and "allow_pickle" in doc
