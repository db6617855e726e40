"""The Python API: `from neuroimagen import Run`; a trained run's EEG in, the evaluation's very images out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from neuroimagen.errors import ConfigError


def test_the_package_root_exports_run_lazily():
    code = ("import sys, neuroimagen; assert 'neuroimagen.api' not in sys.modules and 'torch' not in sys.modules; "
            "from neuroimagen import Run; from neuroimagen.api import Run as R; assert Run is R; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_load_refuses_a_folder_that_is_not_a_run(tmp_path):
    from neuroimagen import Run

    with pytest.raises(ConfigError, match=r"not a neuroimagen run \(no config.yaml\)"):
        Run.load(tmp_path)


def _png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


@pytest.mark.slow
def test_reconstruct_gives_the_evaluations_images(demo_run):
    """Run.reconstruct on one test trial's EEG, with that row's seeds, reproduces the image (and the saliency map)
    `neuroimagen reconstruct` wrote for it, to the PNG's 8-bit quantisation: one code path."""
    from neuroimagen import Run
    from neuroimagen.data.datasets import load_splits

    run_dir = demo_run[0]
    run = Run.load(run_dir)
    assert run.stages[:3] == ["encoder", "saliency", "semantic"]
    df = pd.read_parquet(run_dir / "results" / "per_sample.parquet")
    rec = load_splits(run.cfg.data, image_mode="none")["test"].recording
    for variant in ("L+I", "I"):
        row = df[df["variant"] == variant].iloc[0]
        x = rec.segment(int(row["eeg_item"]))[None]  # (1, C, T)
        images = run.reconstruct(x, variant=variant, seeds=[int(row["seed_noise"])], z_seed=int(row["seed_z"]))
        want = _png(run_dir / row["image"])
        assert images.shape == (1, 1, *want.shape)
        assert (images[0, 0] - want).abs().max() <= 1 / 255 + 1e-4, variant
        sal = run.saliency(x, z_seed=int(row["seed_z"]))[0]
        want_sal = _png(run_dir / row["saliency"])
        assert sal.shape == want_sal.shape and (sal - want_sal).abs().max() <= 1 / 255 + 1e-4


@pytest.mark.slow
def test_reconstruct_shapes_seeds_and_errors(demo_run):
    from neuroimagen import Run

    run = Run.load(demo_run[0])
    eeg, labels = run.eeg("test")
    assert eeg.dim() == 3 and eeg.shape[0] == len(labels) and eeg.shape[1:] == (run.n_chans, run.n_times)
    a = run.reconstruct(eeg[:2], variant="L+I", seeds=[0, 1])
    assert a.shape[:3] == (2, 2, 3) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, run.reconstruct(eeg[:2], variant="L+I", seeds=[0, 1]))  # deterministic
    assert not torch.allclose(a[:, 0], a[:, 1])  # another seed, another sample
    assert not torch.allclose(a[0], a[1])  # another EEG, another image
    assert not torch.allclose(a[:, 0], run.reconstruct(eeg[:2], variant="I", seeds=0)[:, 0])  # the prompt matters
    assert run.features(eeg[:3]).shape[0] == 3
    with pytest.raises(ConfigError, match=r"eeg: expected a \(B, \d+, \d+\) tensor .* got shape \(2, 3, 7\)"):
        run.reconstruct(torch.zeros(2, 3, 7))
    with pytest.raises(ConfigError, match=r"variant 'oracle' needs the dataset .* Run.reconstruct takes EEG only: use one of I, L"):
        run.reconstruct(eeg[:1], variant="oracle")
    with pytest.raises(ConfigError, match=r"variant: unknown 'X' \(defined: I, L"):
        run.reconstruct(eeg[:1], variant="X")
