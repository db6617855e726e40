"""The real cluster path, on loopback: a head and a worker node (`ray start`), `ray job submit -- python
jobs/train.py` and `jobs/ablation.py`, with the ablation's work observed on both nodes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # --block: the node shuts its processes down on SIGTERM
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _cluster(tmp_path_factory, nodes: int):
    """A Ray cluster on 127.0.0.1: a head (4 CPUs alone, 2 with a second node) and optionally a worker node
    (2 CPUs, resource ``second_node``), each with its own ports, this venv first on PATH; stopped by pid."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    dash = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dash, "--dashboard-agent-listen-port": free_port(),
             "--dashboard-agent-grpc-port": free_port(), "--metrics-export-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--ray-client-server-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port()}
    ray_bin = str(Path(sys.executable).parent / "ray")
    short_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--num-cpus={4 if nodes == 1 else 2}", "--include-dashboard=true", f"--temp-dir={short_tmp}",
           *[f"{k}={v}" for k, v in ports.items()]]
    log_path = tmp_path_factory.mktemp("head") / "head.log"
    log = open(log_path, "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while time.time() < deadline:
        r = subprocess.run([ray_bin, "job", "list", "--address", address], env=env, capture_output=True, text=True)
        if r.returncode == 0:
            break
        if head.poll() is not None:
            pytest.fail(f"ray head exited: {log_path.read_text()[-2000:]}")
        time.sleep(2)
    else:
        pytest.fail("ray head did not come up in 90 s")
    wports = {k: free_port() for k in ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                                       "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                       "--runtime-env-agent-port")}
    if nodes == 1:
        try:
            yield address, env, ray_bin
        finally:
            _stop(head)
            log.close()
            shutil.rmtree(short_tmp, ignore_errors=True)
        return
    worker = subprocess.Popen([ray_bin, "start", f"--address=127.0.0.1:{ports['--port']}", "--block",
                               "--node-ip-address=127.0.0.1", "--num-cpus=2", '--resources={"second_node": 1}',
                               f"--temp-dir={short_tmp}",
                               *[f"{k}={v}" for k, v in wports.items()]],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from ray.util.state import list_nodes

        deadline = time.time() + 90
        while len([n for n in list_nodes(address=address) if n.state == "ALIVE"]) < 2:
            if time.time() > deadline or worker.poll() is not None:
                pytest.fail(f"worker node did not join: {log_path.read_text()[-2000:]}")
            time.sleep(2)
        yield address, env, ray_bin
    finally:
        _stop(worker)
        _stop(head)
        log.close()
        shutil.rmtree(short_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    yield from _cluster(tmp_path_factory, 1)


@pytest.fixture(scope="module")
def ray_two_nodes(tmp_path_factory):
    yield from _cluster(tmp_path_factory, 2)


def _submit(ray_head, *args, working_dir: bool = True, env_vars: dict | None = None) -> tuple[str, str]:
    """``ray job submit --no-wait`` (the CLI, as a user types it); waits for the end; (status, logs).

    Without ``working_dir`` the entry point runs the installed package from absolute paths: two nodes on one
    host share Ray's runtime-resources folder, and one node's clean-up of a working_dir package removes the
    other's (the job's current directory) -- an artefact of simulating a cluster on one machine."""
    address, env, ray_bin = ray_head
    wd = ["--working-dir", str(REPO)] if working_dir else []
    renv = ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
    cmd = [ray_bin, "job", "submit", "--address", address, *wd, *renv, "--no-wait", "--", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", r.stdout + r.stderr).group(0)
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)  # status polling only; the submission above is the CLI's
    deadline = time.time() + 600
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.time() < deadline:
        time.sleep(5)
        status = client.get_job_status(job_id)
    return status, client.get_job_logs(job_id)


@pytest.fixture(scope="module")
def job_run(ray_head, tmp_path_factory):
    """Stages 1-3 trained by ``jobs/train.py`` submitted to the loopback head."""
    out = tmp_path_factory.mktemp("job") / "run"
    status, logs = _submit(ray_head, "python", "jobs/train.py", "--config", "configs/quick.yaml", "--out", str(out),
                           "--set", "stages.encoder.epochs=2", "--set", "stages.saliency.epochs=2",
                           "--set", "stages.semantic.epochs=2", "--set", "train.progress=false")
    return out, status, logs


def test_ray_job_submit_trains_every_stage(job_run):
    from ray.job_submission import JobStatus

    out, status, logs = job_run
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert set(record["stages"]) == {"encoder", "saliency", "semantic", "semantic_image"}
    for stage in ("encoder", "saliency", "semantic"):
        assert (out / stage / "model" / "model.json").is_file()
        assert list((out / "ray" / stage).glob("checkpoint_*")), stage  # Ray Train storage
    m = json.loads((out / "encoder" / "metrics.json").read_text())
    assert "val_knn_acc" in m and m["chance"] == pytest.approx(1 / 6)
    assert json.loads((out / "semantic" / "metrics.json").read_text())["val_nearest_class_acc"] >= 0
    assert "[semantic] done:" in logs  # the one-line summaries reach the job log


def test_ray_job_submit_runs_the_ablation_on_the_trained_run(ray_two_nodes, job_run):
    """jobs/ablation.py reuses the trained stages, trains the tiny LDM and the judge, reconstructs with Ray Data."""
    import pandas as pd
    from ray.job_submission import JobStatus

    out, status, _ = job_run
    assert status == JobStatus.SUCCEEDED
    status, logs = _submit(ray_two_nodes, sys.executable, str(REPO / "jobs" / "ablation.py"), "--config",
                           str(REPO / "configs" / "quick.yaml"), "--out", str(out),
                           "--variants", "L+I,other-class", "--subjects", "1", "--set", "ldm.vae_steps=10",
                           "--set", "ldm.unet_steps=10", "--set", "ldm.samples_per_eeg=1", "--set", "eval.judge_steps=30",
                           "--set", "stages.encoder.epochs=2", "--set", "stages.saliency.epochs=2",
                           "--set", "stages.semantic.epochs=2", "--set", "train.progress=false", "--set", "eval.actors=2", working_dir=False,
                           # Ray Data starts pool actors asynchronously: one actor may finish every batch before the
                           # other is placed (then it is listed with node id None). Waiting for the whole pool makes
                           # both actors placed before the first batch, so the placement read below is not a race.
                           env_vars={"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300"})
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "ablation: reusing the trained stages" in logs and "reconstruct: 24 images" in logs
    summary = pd.read_csv(out / "results" / "summary.csv", dtype={"subject": str})
    assert set(zip(summary["subject"], summary["variant"])) == {("1", "L+I"), ("all", "L+I"), ("1", "other-class"),
                                                                  ("all", "other-class")}
    assert (out / "report" / "report.md").is_file() and "| 5 (L+I)" in logs
    # the Ray Data actors of the ablation (two generation actors: more CPUs than one node has) ran on both nodes
    from ray.util.state import list_actors

    actors = [a for a in list_actors(address=ray_two_nodes[0], limit=1000, detail=True)
              if "MapBatches" in (a.class_name or "")]
    placed = [(a.class_name, a.node_id) for a in actors]
    assert len(actors) >= 2 and all(a.node_id for a in actors), placed  # every pool actor was placed
    assert len({a.node_id for a in actors}) == 2, placed
