"""Provenance: the versions, source commit and hardware recorded with every number."""

from __future__ import annotations

import os
import subprocess

import torch

from neuroimagen.provenance import differences, package_versions, provenance, source_commit


def test_provenance_names_versions_hardware_and_commit():
    p = provenance()
    assert p["packages"]["torch"] == torch.__version__.split("+")[0]
    assert p["packages"]["numpy"] and p["packages"]["neuroimagen"]
    assert p["cpu_count"] == os.cpu_count() and p["torch_threads"] == torch.get_num_threads()
    assert p["cuda"] == torch.cuda.is_available() and p["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(p["source"]) == {"commit", "dirty"}


def test_package_versions_of_a_missing_package_is_none():
    assert package_versions(("torch", "no-such-distribution-xyz")) == {
        "torch": package_versions(("torch",))["torch"], "no-such-distribution-xyz": None}


def test_source_commit_reads_git_and_sees_uncommitted_changes(tmp_path):
    assert source_commit(tmp_path) == {"commit": None, "dirty": None}  # not a checkout: recorded as unknown
    git = ["git", "-C", str(tmp_path), "-c", "user.email=a@b", "-c", "user.name=n"]
    subprocess.run(git + ["init", "-q"], check=True)
    (tmp_path / "f.py").write_text("x = 1\n")
    subprocess.run(git + ["add", "f.py"], check=True)
    subprocess.run(git + ["commit", "-qm", "c"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert source_commit(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "f.py").write_text("x = 2\n")
    assert source_commit(tmp_path) == {"commit": head, "dirty": True}


def test_differences_name_the_versions_that_differ():
    a = {"packages": {"torch": "2.14.1", "numpy": "2.4.6", "ray": "2.60.0"}, "cpu_capability": "AVX512", "cuda": False}
    b = {"packages": {"torch": "2.13.0", "numpy": "2.4.6", "ray": "2.59.0"}, "cpu_capability": "AVX2", "cuda": False}
    assert differences(a, b) == ["torch 2.14.1 vs 2.13.0", "cpu_capability AVX512 vs AVX2"]
    assert differences(a, a) == []


def test_constraints_pin_every_dependency_within_its_declared_range():
    """constraints.txt (what make/CI install) pins each declared dependency to one version its range admits."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    from conftest import REPO

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: '{line}' is not an exact pin"
            pins[canonicalize_name(name)] = version.strip()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [d for ds in project["optional-dependencies"].values() for d in ds]
    for spec in declared:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt has no pin for {req.name} (declared '{spec}')"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside '{spec}'"
