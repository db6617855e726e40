"""Import hygiene: the core never pulls in Ray; the CLI starts fast."""

from __future__ import annotations

import subprocess
import sys
import time

CORE = ["neuroimagen", "neuroimagen.config", "neuroimagen.errors", "neuroimagen.atomic", "neuroimagen.rundir",
        "neuroimagen.probe",
        "neuroimagen.data.datasets", "neuroimagen.data.eeg_imagenet", "neuroimagen.data.things_eeg",
        "neuroimagen.data.synthetic", "neuroimagen.data.captions", "neuroimagen.data.inspection",
        "neuroimagen.runs.demo", "neuroimagen.cli", "neuroimagen.losses", "neuroimagen.augment",
        "neuroimagen.models.eeg_encoders", "neuroimagen.models.saliency_gan", "neuroimagen.models.semantic",
        "neuroimagen.models.text_encoder", "neuroimagen.metrics.embedding", "neuroimagen.metrics.nway",
        "neuroimagen.metrics.inception_score", "neuroimagen.metrics.ssim", "neuroimagen.training.loop",
        "neuroimagen.training.checkpoint", "neuroimagen.training.samplers", "neuroimagen.runs.training",
        "neuroimagen.stages.encoder", "neuroimagen.stages.saliency", "neuroimagen.stages.semantic",
        "neuroimagen.models.ldm", "neuroimagen.models.classifier", "neuroimagen.frozen.ldm", "neuroimagen.frozen.judge",
        "neuroimagen.reconstruction.rows", "neuroimagen.reconstruction.images", "neuroimagen.reconstruction.decode",
        "neuroimagen.reconstruction.generate", "neuroimagen.reconstruction.score", "neuroimagen.reconstruction.reconstruct",
        "neuroimagen.reconstruction.factory", "neuroimagen.runs.evaluation", "neuroimagen.metrics.summary",
        "neuroimagen.runs.reports", "neuroimagen.runs.sweeps", "neuroimagen.logs", "neuroimagen.rundir"]


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_core_does_not_import_ray():
    mods = ", ".join(f"'{m}'" for m in CORE)
    out = run(f"import importlib, sys\nfor m in [{mods}]: importlib.import_module(m)\n"
              "print(sorted(k for k in sys.modules if k == 'ray' or k.startswith('ray.')))")
    assert out == "[]"


def test_cli_and_package_do_not_import_torch():
    out = run("import sys, neuroimagen, neuroimagen.cli, neuroimagen.config; print('torch' in sys.modules, 'yaml' in sys.modules)")
    assert out == "False False"


def test_help_is_fast():
    exe = [sys.executable, "-m", "neuroimagen.cli", "--help"]
    base = [sys.executable, "-c", "pass"]

    def best(cmd, n=3):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times.append(time.perf_counter() - t)
        return min(times)

    extra = best(exe) - best(base)
    assert extra < 0.5, f"neuroimagen --help takes {extra:.2f} s more than python -c pass"


def test_config_knows_the_diffaugment_policies():
    from neuroimagen.augment import POLICIES
    from neuroimagen.config import DIFFAUGMENT_POLICIES

    assert tuple(POLICIES) == tuple(DIFFAUGMENT_POLICIES)
