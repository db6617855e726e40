"""``neuroimagen demo --quick`` and the default demo as subprocesses: wall time and peak memory of the whole tree."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench_common import ROOT, run_tree

GIB = 4.0
_MARKS = ("[", "tiny LDM:", "judge classifier:", "reconstruct:", "done in")


def _is_mark(line: str) -> bool:
    """The demo's step lines ('[3/8] ...'), its stage / LDM / judge / reconstruction lines, and its last line."""
    line = line.strip()
    if line.startswith("[") and ("/" in line.split("]")[0] or "] training" in line or "] done" in line):
        return "epoch " not in line  # not the per-epoch lines
    return line.startswith(_MARKS[1:]) and not line.startswith("reconstruct: shard")


def _demo_row(label: str, args: list[str], limit_s: float, timeout: float, tmp: Path) -> tuple[dict, dict]:
    slug = "".join(c if c.isalnum() else "-" for c in label)
    out = tmp / slug
    log = tmp / f"{slug}.log"
    cmd = [sys.executable, "-m", "neuroimagen.cli", "demo", *args, "--out", str(out)]
    res = run_tree(cmd, ROOT, log, timeout, mark=_is_mark)
    marks = res.pop("marks")
    # seconds spent in each step: from its marker line to the next one (or the end)
    steps = {}
    for i, (t, line) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else res["wall_s"]
        steps[line] = round(end - t, 1)
    res["seconds per step (from the demo's own progress lines)"] = steps
    tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.is_file() else []
    ok = res["returncode"] == 0
    wall, tree = res["wall_s"], res["peak_tree_rss_gib"]
    met = ok and wall <= limit_s and tree <= GIB
    why = None
    if not met:
        parts = []
        if res["timed_out"]:
            parts.append(f"the demo did not finish within the bench's {timeout:.0f} s timeout (killed); last lines: "
                         f"{' | '.join(tail)[-300:]}")
        elif not ok:
            parts.append(f"the demo failed (exit {res['returncode']}): {' | '.join(tail)[-300:]}")
        if wall > limit_s:
            parts.append("time: training on Ray Train pays its fixed start-up once per stage (worker group, checkpoint "
                         "storage) and Ray Data starts three actor pools before the first image; on 2 cores Ray's own "
                         "processes also slow every step" if "--quick" not in args else
                         "time: the quick demo runs in-process; the 2 shared cores and the tiny LDM/judge training "
                         "set its length")
        if tree > GIB:
            parts.append(f"memory: the tree peak sums RSS over {res['peak_processes']} processes (every Ray worker "
                         f"maps torch anew; PSS, which counts shared pages once, peaked at {res['peak_tree_pss_gib']:.2f} GiB)")
        why = "; ".join(parts)
    row = {"what": f"`neuroimagen {' '.join(['demo', *args])}` wall time and peak memory (driver + Ray processes)",
           "compared with": "-", "ratio": None,
           "target": f"<= {limit_s / 60:.0f} min wall, peak RSS <= {GIB:.0f} GiB", "met": met,
           "detail": (("timed out: " if res["timed_out"] else "") + f"{wall:.0f} s; peak RSS {tree:.2f} GiB summed over the tree (PSS {res['peak_tree_pss_gib']:.2f} GiB), "
                      f"driver {res['peak_driver_rss_gib']:.2f} GiB, up to {res['peak_processes']} processes"
                      + ("" if ok else f"; exit {res['returncode']}")),
           **({"why": why} if why else {})}
    return row, {**res, "command": " ".join(cmd[1:]), "log tail": tail}


# bench --quick: the same commands with short schedules (every step still runs, on the same backends)
_SHORT = ["stages.encoder.epochs=2", "stages.saliency.epochs=2", "stages.semantic.epochs=2", "ldm.vae_steps=10",
          "ldm.unet_steps=20", "eval.judge_steps=10", "ldm.samples_per_eeg=1"]


def bench_demo(repeats: int, quick: bool = False) -> dict:
    """Each demo runs once (it is minutes long). With bench ``--quick`` both run with short schedules: a smoke test
    of the harness (the tree sampler sees Ray's processes in the default demo), not the targets."""
    rows, bd = [], {}
    short = [a for s in _SHORT for a in ("--set", s)] if quick else []
    with tempfile.TemporaryDirectory(prefix="nbench-demo-") as tmp:
        for label, args, limit, timeout in (("demo --quick", ["--quick"], 180, 900), ("demo (default)", [], 600, 2400)):
            row, info = _demo_row(label, args + short, limit, timeout, Path(tmp))
            if quick:
                row.update(what=row["what"].split(" --set")[0] + "` with short schedules (bench --quick smoke test)",
                           met=None, target="(smoke test; the target applies to the full command)")
                row.pop("why", None)
            rows.append(row)
            bd[label] = info
    for v in bd.values():
        v["peak memory sampling"] = "every 0.5 s from /proc (VmRSS summed over the tree; PSS from smaps_rollup)"
    return {"rows": rows, "breakdown": bd}
