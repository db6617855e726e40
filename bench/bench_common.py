"""Shared pieces of the benchmarks: subprocess probes, cached prepared runs, a process-tree memory sampler.

Every measurement that trains, starts Ray or loads models runs in its own subprocess (``bench/probe.py``),
so Ray instances, torch thread settings and memory never leak from one measurement into the next, and both
sides of a ratio pay the same process conditions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROBE = HERE / "probe.py"


def median(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def env(**extra: str) -> dict:
    """The environment of every probe: Ray without token auth (loopback only), no progress bars."""
    e = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    e.update(extra)
    return e


def probe(kind: str, args: dict, timeout: float = 1800, log_name: Optional[str] = None) -> dict:
    """Run ``bench/probe.py KIND`` in a fresh interpreter; returns the JSON it writes.

    The child's output goes to a log file (shown on failure), never into the bench's stdout.
    """
    with tempfile.TemporaryDirectory(prefix="nbench-probe-") as tmp:
        out = Path(tmp) / "out.json"
        log = Path(tmp) / "log.txt"
        spec = Path(tmp) / "args.json"
        spec.write_text(json.dumps(args), encoding="utf-8")
        t = time.perf_counter()
        with open(log, "w") as fh:
            res = subprocess.run([sys.executable, str(PROBE), kind, str(spec), str(out)], cwd=str(ROOT), env=env(),
                                 stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
        wall = time.perf_counter() - t
        if res.returncode != 0 or not out.is_file():
            tail = log.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"probe {kind} failed (exit {res.returncode}) after {wall:.0f} s:\n{tail}")
        doc = json.loads(out.read_text())
        doc["probe_wall_s"] = wall
        return doc


def _source_hash() -> str:
    """Hash of the package source: a cached prepared run is rebuilt when the code changes."""
    h = hashlib.sha256()
    for p in sorted((ROOT / "neuroimagen").rglob("*.py")):
        h.update(p.relative_to(ROOT).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:10]


def cache_root() -> Path:
    return Path(os.environ.get("NEUROIMAGEN_BENCH_CACHE", Path(tempfile.gettempdir()) / "neuroimagen-bench"))


def prepared(name: str, spec: dict) -> Path:
    """A prepared run directory (``probe.py setup``), cached under the temp dir by spec and source hash."""
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    d = cache_root() / f"{name}-{key}-{_source_hash()}"
    if (d / "prepared.json").is_file():
        return d
    for old in d.parent.glob(f"{name}-{key}-*"):  # the same run prepared from older source: stale
        shutil.rmtree(old, ignore_errors=True)
    d.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    probe("setup", {**spec, "run_dir": str(d)})
    print(f"  prepared {name} in {time.perf_counter() - t:.0f} s -> {d}", file=sys.stderr)
    return d


def fresh_copy(base: Path, parent: Path, name: str, parts: Sequence[str] = ("twin",)) -> Path:
    """A new run directory holding copies of ``parts`` of a prepared run (training resumes otherwise)."""
    d = parent / name
    d.mkdir(parents=True)
    for p in parts:
        src = base / p
        if src.is_dir():
            shutil.copytree(src, d / p)
        elif src.is_file():
            shutil.copy2(src, d / p)
    return d


# ---------------------------------------------------------------------------------------------------------------
# Memory of a process tree (driver + Ray's processes), from /proc (psutil is not a dependency)


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def tree(pid: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _kib(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class TreeMemory:
    """Samples RSS (and PSS, which counts shared pages once) of a process and all its descendants."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid, self.interval = pid, interval
        self.peak_driver_rss = self.peak_tree_rss = self.peak_tree_pss = 0
        self.peak_procs = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = tree(self.pid)
            rss = {p: _kib(f"/proc/{p}/status", "VmRSS:") for p in pids}
            pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
            self.peak_driver_rss = max(self.peak_driver_rss, rss.get(self.pid, 0))
            self.peak_tree_rss = max(self.peak_tree_rss, sum(rss.values()))
            self.peak_tree_pss = max(self.peak_tree_pss, pss)
            self.peak_procs = max(self.peak_procs, sum(1 for v in rss.values() if v))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def as_dict(self) -> dict:
        g = 2**20
        return {"peak_driver_rss_gib": self.peak_driver_rss / g, "peak_tree_rss_gib": self.peak_tree_rss / g,
                "peak_tree_pss_gib": self.peak_tree_pss / g, "peak_processes": self.peak_procs, "samples": self.samples}


def run_tree(cmd: list[str], cwd: Path, log: Path, timeout: float, mark=None) -> dict:
    """Run ``cmd``, sampling its tree's memory; returns wall time, exit code, memory peaks and the time at which
    each output line accepted by ``mark`` appeared (a per-step breakdown of the run)."""
    marks: list[tuple[float, str]] = []
    t = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, cwd=str(cwd), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True, text=True, errors="replace")

        def read() -> None:
            for line in p.stdout:
                fh.write(line)
                if mark is not None and mark(line):
                    marks.append((time.perf_counter() - t, line.strip()[:120]))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        timed_out = False
        with TreeMemory(p.pid) as mem:
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(p.pid, 9)
                rc = p.wait()
        wall = time.perf_counter() - t
        reader.join(timeout=10)
    # Ray's daemons leave with the driver; end any straggler of this session.
    try:
        os.killpg(p.pid, 15)
    except ProcessLookupError:
        pass
    return {"wall_s": wall, "returncode": rc, "timed_out": timed_out, **mem.as_dict(), "marks": marks}
