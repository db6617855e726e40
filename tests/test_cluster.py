"""The Ray cluster launcher config (cluster.yaml) and the run config used on it (configs/cluster.yaml).

Offline and fast: nothing here talks to AWS or starts Ray. What `ray up` checks before it calls AWS is
reproduced with the schema shipped inside the installed Ray and with Ray's own ``prepare_config`` /
``validate_config`` (a private API: valid because the project pins ray==2.60.*, see pyproject.toml).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import socket
from pathlib import Path, PurePosixPath

import pytest
import yaml

from conftest import REPO

CLUSTER_YAML = REPO / "cluster.yaml"
RUN_CONFIG = REPO / "configs" / "cluster.yaml"

# vCPUs and GPUs of the instance types this config may use (extend when cluster.yaml changes type).
INSTANCE_TYPES = {
    "g4dn.xlarge": (4, 1), "g4dn.2xlarge": (8, 1), "g4dn.12xlarge": (48, 4),
    "g5.xlarge": (4, 1), "g5.2xlarge": (8, 1), "g5.4xlarge": (16, 1), "g5.12xlarge": (48, 4),
    "g6.xlarge": (4, 1), "g6.2xlarge": (8, 1), "g6.12xlarge": (48, 4), "g6e.xlarge": (4, 1),
    "p4d.24xlarge": (96, 8), "p5.48xlarge": (192, 8),
    "m5.2xlarge": (8, 0), "m5.4xlarge": (16, 0), "c6i.4xlarge": (16, 0),
}


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cluster() -> dict:
    return load_cluster()


@pytest.fixture(scope="module")
def schema() -> dict:
    import ray

    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def run_cfg():
    from neuroimagen.config import load_config

    return load_config(RUN_CONFIG)


def worker_types(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def shared_mount(cfg: dict) -> PurePosixPath:
    """The path that is both NFS-mounted on the host (initialization_commands) and bind-mounted into the
    container at the same place (docker.run_options ``-v SRC:DST``)."""
    init = "\n".join(cfg.get("initialization_commands", []))
    found = set()
    for opt in cfg["docker"].get("run_options", []):
        tokens = shlex.split(opt)
        for flag, value in zip(tokens, tokens[1:]):
            if flag in ("-v", "--volume"):
                src, dst = value.split(":")[:2]
                if src == dst and re.search(rf"\bmount\b[^;]*\s{re.escape(src)}(?=[\s)]|$)", init):
                    found.add(PurePosixPath(dst))
    assert len(found) == 1, f"expected one shared filesystem mounted on the host and into the container, got {found}"
    return found.pop()


def on_shared(path, mount: PurePosixPath) -> bool:
    return isinstance(path, str) and (path.startswith(("s3://", "gs://")) or PurePosixPath(path).is_relative_to(mount))


def job_command(cfg_text: str) -> list[str]:
    """The `ray job submit ...` command of cluster.yaml's header comment, as argv."""
    comments = [ln.lstrip("#").strip() for ln in cfg_text.splitlines() if ln.startswith("#")]
    lines = [ln for ln in comments if ln.startswith("ray job submit ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {' '.join(argv)}"
    return argv[argv.index(name) + 1]


def image_of(cfg: dict, node_type: str) -> str:
    docker = cfg["docker"]
    if node_type == cfg["head_node_type"]:
        return docker.get("head_image", docker["image"])
    node_docker = cfg["available_node_types"][node_type].get("docker", {})
    return node_docker.get("worker_image", docker.get("worker_image", docker["image"]))


# ---------------------------------------------------------------------------------------------
# What `ray up` validates


def test_validates_against_rays_schema(cluster, schema):
    import jsonschema

    jsonschema.validate(cluster, schema)


def test_passes_rays_own_prepare_and_validate_offline(cluster, monkeypatch):
    # Private API (ray.autoscaler._private): the project pins ray==2.60.*, revisit when it moves.
    from ray.autoscaler._private.util import prepare_config, validate_config

    def no_network(*a, **k):
        raise AssertionError("prepare_config/validate_config tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    # prepare_config merged Ray's AWS defaults without dropping ours.
    assert prepared["available_node_types"][cluster["head_node_type"]]["max_workers"] == 0
    assert prepared["head_start_ray_commands"] == cluster["head_start_ray_commands"]


@pytest.mark.parametrize("breakage", ["typo_top_level_key", "min_workers_as_string", "unknown_docker_key"])
def test_broken_copies_fail(cluster, schema, breakage):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(cluster)
    if breakage == "typo_top_level_key":
        bad["max_worker"] = bad.pop("max_workers")
    elif breakage == "min_workers_as_string":
        bad["available_node_types"]["gpu_worker"]["min_workers"] = "0"
    else:
        bad["docker"]["run_option"] = bad["docker"].pop("run_options")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


# ---------------------------------------------------------------------------------------------
# Security

SECRET_KEY = re.compile(r"aws_access_key_id|aws_secret_access_key|aws_session_token|aws_credentials|secret|token"
                        r"|password|passwd|private_key|api_key", re.IGNORECASE)
SECRET_VALUE = re.compile(r"aws_access_key_id|aws_secret_access_key|secret|token|password|BEGIN [A-Z ]*PRIVATE KEY"
                          r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", re.IGNORECASE)


def walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{path}.{k}", k, None
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")
    else:
        yield path, None, node


def test_no_credentials_anywhere(cluster):
    for where, key, value in walk(cluster):
        if key is not None:
            assert not SECRET_KEY.search(str(key)), f"credential-like key at {where}"
        elif isinstance(value, str):
            assert not SECRET_VALUE.search(value), f"credential-like value at {where}: {value[:60]!r}"
    assert set(cluster["auth"]) == {"ssh_user"}
    # Comments too: a pasted key or access key id must not hide there.
    text = CLUSTER_YAML.read_text(encoding="utf-8")
    assert not re.search(r"BEGIN [A-Z ]*PRIVATE KEY|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", text)


def test_secret_scan_catches_planted_credentials(cluster):
    planted = copy.deepcopy(cluster)
    planted["provider"]["aws_credentials"] = {"aws_access_key_id": "AKIAABCDEFGHIJKLMNOP"}
    assert any(key is not None and SECRET_KEY.search(str(key)) for _, key, _ in walk(planted))
    assert SECRET_VALUE.search("-----BEGIN OPENSSH PRIVATE KEY-----")


def test_dashboard_stays_on_the_heads_loopback(cluster):
    starts = [shlex.split(c) for c in cluster["head_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 1
    argv = starts[0]
    assert "--head" in argv
    hosts = [a.split("=", 1)[1] for a in argv if a.startswith("--dashboard-host=")]
    assert hosts == ["127.0.0.1"], argv
    for cmd in cluster["worker_start_ray_commands"]:
        assert "0.0.0.0" not in cmd


def test_head_takes_no_training_work(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU"), head["resources"]


def test_train_health_check_interval_reaches_every_raylet(cluster):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cluster[key] if "ray start" in c]
        assert starts and all(re.search(r"(^|\s)RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0\.1\s+ray start\b", c) for c in starts), key


# ---------------------------------------------------------------------------------------------
# Shared storage and the run config


def test_run_config_paths_are_on_the_shared_filesystem(cluster, run_cfg):
    mount = shared_mount(cluster)
    if sum(t.get("max_workers", cluster["max_workers"]) for t in worker_types(cluster).values()) == 0:
        pytest.skip("single-node cluster: nothing needs to be shared")
    argv = job_command(CLUSTER_YAML.read_text(encoding="utf-8"))
    out = option(argv, "--out")
    assert on_shared(out, mount), f"--out {out} is not on {mount}"
    assert (REPO / option(argv, "--config")).resolve() == RUN_CONFIG
    # Ray Train storage: explicit and shared, or null = <--out>/ray, which is shared when --out is.
    storage = run_cfg.train.storage_path
    assert storage is None or on_shared(storage, mount), f"train.storage_path {storage} is not on {mount}"
    paths = {"data.eeg": run_cfg.data.eeg, "data.splits": run_cfg.data.splits, "data.images": run_cfg.data.images,
             "text_encoder.pretrained": run_cfg.text_encoder.pretrained, "ldm.pretrained": run_cfg.ldm.pretrained,
             "eval.classifier_weights": run_cfg.eval.classifier_weights}
    if run_cfg.data.captions is not None:
        paths["data.captions"] = run_cfg.data.captions
    for key, path in paths.items():
        assert on_shared(path, mount), f"{key} = {path} is not on {mount}"


def test_shared_mount_is_parsed_not_assumed(cluster):
    assert shared_mount(cluster) == PurePosixPath("/mnt/shared")
    moved = copy.deepcopy(cluster)
    moved["docker"]["run_options"] = [o for o in moved["docker"]["run_options"] if not o.startswith("-v ")]
    with pytest.raises(AssertionError):
        shared_mount(moved)


def test_gpu_workers_and_gpu_run_config(cluster, run_cfg):
    gpu_types = {name: t for name, t in worker_types(cluster).items()
                 if INSTANCE_TYPES.get(t["node_config"]["InstanceType"], (0, 0))[1] > 0}
    assert gpu_types, "no worker type with a GPU instance"
    for name, t in worker_types(cluster).items():
        itype = t["node_config"]["InstanceType"]
        assert itype in INSTANCE_TYPES, f"{name}: add {itype} (vCPUs, GPUs) to INSTANCE_TYPES"
        image = image_of(cluster, name)
        if name in gpu_types:
            assert image.endswith("-gpu"), f"{name} ({itype}) runs {image}, not a -gpu image"
            opts = cluster["docker"].get("run_options", []) + t.get("docker", {}).get("worker_run_options", [])
            assert any(o.startswith("--gpus") for o in opts), f"{name}: the container gets no --gpus"
    assert run_cfg.train.use_gpu and run_cfg.eval.use_gpu, "configs/cluster.yaml: train.use_gpu / eval.use_gpu"
    assert run_cfg.train.backend == "ray" and run_cfg.eval.backend == "ray"
    # One DDP rank needs one GPU node with cpus_per_worker CPUs; the cluster can hold all of them.
    gpu_nodes = sum(t["max_workers"] * INSTANCE_TYPES[t["node_config"]["InstanceType"]][1] for t in gpu_types.values())
    fits = [INSTANCE_TYPES[t["node_config"]["InstanceType"]][0] >= run_cfg.train.cpus_per_worker for t in gpu_types.values()]
    assert any(fits), "train.cpus_per_worker exceeds the vCPUs of every GPU instance type"
    assert run_cfg.train.num_workers <= gpu_nodes and run_cfg.eval.actors <= gpu_nodes
    assert run_cfg.ldm.dtype == "float16"
    assert run_cfg.ldm.pretrained == run_cfg.text_encoder.pretrained


def test_images_pinned_to_the_installed_ray(cluster):
    import ray

    docker = cluster["docker"]
    images = [docker.get(k) for k in ("image", "head_image", "worker_image")]
    images += [t.get("docker", {}).get("worker_image") for t in cluster["available_node_types"].values()]
    images = [i for i in images if i]
    assert images
    for image in images:
        repo, tag = image.rsplit(":", 1)
        assert repo == "rayproject/ray", image  # rayproject/ray-ml ended at 2.49
        assert tag.startswith(f"{ray.__version__}-"), f"{image} is not Ray {ray.__version__}"
    assert image_of(cluster, cluster["head_node_type"]).endswith("-cpu")


def test_repo_is_mounted_and_installed(cluster):
    (remote, local), = cluster["file_mounts"].items()
    assert local == "." and any("pip install" in c and f"-e {remote}" in c for c in cluster["setup_commands"])
    assert any(re.search(r"\btorch\b", c) and re.search(r"\btorchvision\b", c) for c in cluster["setup_commands"])
