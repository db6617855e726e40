"""Shared fixtures: tiny synthetic twins (written once per session) and CLI helpers."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback test clusters run without token auth
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # as init_ray: reports acknowledged in 0.1 s, not 2 s

# A fresh TorchInductor cache per test session: its cache key does not include the CPU capability that ATen and
# oneDNN were limited to (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA), so kernels compiled by a `make test-avx2`
# session were reused by a native session and crashed it (SIGSEGV in test_torch_compile_matches_eager...).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache = tempfile.mkdtemp(prefix="neuroimagen-inductor-")
    atexit.register(shutil.rmtree, _inductor_cache, ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]

TINY_EEG_IMAGENET = dict(format="eeg-imagenet", classes=6, images_per_class=10, subjects=2, channels=8,
                         image_size=32, seed=3)
TINY_THINGS = dict(format="things-eeg", classes=4, test_classes=3, images_per_class=10, subjects=2, layout="17x100",
                   image_size=32, train_repetitions=2, test_repetitions=3, seed=5)


def make_twin(path: Path, **kw) -> Path:
    from neuroimagen.config import SynthConfig
    from neuroimagen.data.synthetic import synthesize

    synthesize(path, SynthConfig(**kw), show_progress=False)
    return path


@pytest.fixture(scope="session")
def twin(tmp_path_factory) -> Path:
    """A tiny EEG-ImageNet-layout twin (read-only: tests must not modify it)."""
    return make_twin(tmp_path_factory.mktemp("twin") / "d", **TINY_EEG_IMAGENET)


@pytest.fixture(scope="session")
def things_twin(tmp_path_factory) -> Path:
    """A tiny THINGS-EEG2-layout twin (read-only)."""
    return make_twin(tmp_path_factory.mktemp("things") / "d", **TINY_THINGS)


@pytest.fixture
def twin_cfg(twin):
    from neuroimagen.config import load_config

    return load_config(twin / "config.yaml")


@pytest.fixture(scope="module")
def saliency_parts(twin):
    """(config, inputs) of a tiny stage 2 on ``twin``: 32 px, narrow G and D, 3 validation z, an untrained encoder."""
    import dataclasses

    from neuroimagen.config import load_config
    from neuroimagen.data.datasets import load_splits
    from neuroimagen.stages import build_stage
    from neuroimagen.training.context import RunContext, unwrap

    cfg = load_config(twin / "config.yaml")
    sc = dataclasses.replace(cfg.stages.saliency, resolution=32, g_width=8, d_width=8, val_samples=3)
    cfg = dataclasses.replace(cfg, stages=dataclasses.replace(cfg.stages, saliency=sc))
    splits = load_splits(cfg.data, image_mode="path")
    enc = build_stage("encoder", cfg, RunContext(), {"splits": splits})
    inputs = {"splits": splits, "encoder_spec": enc.specs()["encoder"],
              "encoder_state": unwrap(enc.modules()["encoder"]).state_dict()}
    return cfg, inputs


@pytest.fixture(scope="module")
def semantic_parts(twin, tmp_path_factory):
    """(config, splits, label-caption targets, run directory) of a tiny stage 3 on ``twin``."""
    from neuroimagen.config import load_config
    from neuroimagen.data.datasets import load_splits
    from neuroimagen.stages.semantic import build_targets

    cfg = load_config(twin / "config.yaml")
    run_dir = tmp_path_factory.mktemp("semantic-run")
    splits = load_splits(cfg.data, image_mode="none")
    targets = build_targets(cfg, splits, run_dir, "label")
    return cfg, splits, targets, run_dir


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self):
        return f"CliResult(code={self.code}, out={self.out[-500:]!r}, err={self.err[-800:]!r})"


@pytest.fixture
def run_cli(capsys):
    """Run ``neuroimagen ARGS`` in-process; returns exit code and captured output."""
    from neuroimagen.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        cap = capsys.readouterr()
        return CliResult(code, cap.out, cap.err)

    return run


def assert_one_line_error(res: CliResult, *fragments: str) -> None:
    """Exit code 2, exactly one stderr line 'neuroimagen: error: ...' holding every fragment."""
    assert res.code == 2, res
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert len(lines) == 1, res
    assert lines[0].startswith("neuroimagen: error: "), res
    assert "Traceback" not in res.err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (4 logical CPUs on 2 cores: headroom)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, object_store_memory=256 * 2**20, include_dashboard=True, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


DEMO_SETS = ["train.backend=local", "eval.backend=local", "train.progress=false"]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The quick demo with local backends, run once per session (about 2.5 minutes on 2 cores): a trained,
    reconstructed, scored and reported run directory. Read-only: tests copy it before changing anything.

    Returns (run directory, the demo's return value, what it printed on stdout and the lines it asks to show).
    """
    import contextlib
    import io

    from neuroimagen.config import load_config
    from neuroimagen.runs.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = run_demo(load_config(None, DEMO_SETS), str(out), quick=True, user_overrides=DEMO_SETS)
    return out, res, buf.getvalue() + "\n".join(res["lines"])
