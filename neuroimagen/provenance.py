"""What produced a number: software versions, the source commit, the device and the CPU.

:func:`provenance` is recorded with every stage in ``run.json``, in ``results/state.json`` at reconstruction
and in ``results/protocol.json``, so two runs that disagree can be told apart by what they ran on, and a
reference result names the versions it came from. Nothing here fails: an unknown value is recorded as
``None``.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Optional

# the packages whose versions change a number (or the speed) of a run
PACKAGES = ("neuroimagen", "torch", "torchvision", "diffusers", "transformers", "ray", "numpy", "scipy", "pandas",
            "scikit-image", "safetensors")


def package_versions(names=PACKAGES) -> dict[str, Optional[str]]:
    """{distribution: installed version or None}."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def source_commit(path: Optional[Path] = None) -> dict[str, Optional[object]]:
    """{'commit': the git commit of the neuroimagen source (None outside a checkout), 'dirty': uncommitted changes}."""
    root = Path(path or Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "."],
                                capture_output=True, text=True, timeout=5)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def cpu_model() -> Optional[str]:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def device_info() -> dict[str, object]:
    """Torch's view of the hardware: CUDA devices, the CPU kernels' ISA, thread counts."""
    import torch  # noqa: PLC0415 - the ground layer stays importable without torch loaded

    info: dict[str, object] = {"cuda": torch.cuda.is_available(), "cuda_devices": [], "cuda_version": torch.version.cuda}
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        info["cpu_capability"] = None
    info["torch_threads"] = torch.get_num_threads()
    return info


def provenance() -> dict[str, object]:
    """Everything above in one JSON-able dict."""
    return {"packages": package_versions(), "source": source_commit(), "python": platform.python_version(),
            "platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(), **device_info(),
            "isa_limits": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}}


_DIFFERING = ("torch", "torchvision", "diffusers", "transformers", "numpy", "scipy", "scikit-image")


def differences(a: dict, b: dict) -> list[str]:
    """Human lines naming what differs between two provenance records (versions of the packages that change
    numbers, CPU ISA, CUDA), e.g. for a result that does not match its reference."""
    out = []
    pa, pb = a.get("packages", {}), b.get("packages", {})
    for name in _DIFFERING:
        if pa.get(name) != pb.get(name):
            out.append(f"{name} {pa.get(name)} vs {pb.get(name)}")
    for key in ("cpu_capability", "cuda"):
        if a.get(key) != b.get(key):
            out.append(f"{key} {a.get(key)} vs {b.get(key)}")
    return out
