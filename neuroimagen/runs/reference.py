"""The README's results, generated from a run and checked against it.

``neuroimagen report RUN --reference FILE --readme README.md`` turns an evaluated run into a *reference*
(``docs/reference/quick-demo.json``: the pooled numbers of every variant, the rendered results block and the
provenance of the run), and rewrites the README's block between ``<!-- results:begin -->`` and
``<!-- results:end -->`` from it. The README's table is therefore never typed, and a test runs the quick demo
and checks it against the committed reference within :data:`TOLERANCE`; when it does not match, the message
names the package versions and CPU features that differ from the reference's.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

from neuroimagen.atomic import write_text
from neuroimagen.errors import DataError
from neuroimagen.provenance import differences
from neuroimagen.runs.reports import ablation_table, acc_note, load_protocol, load_summary, protocol_line, suite_table

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

# absolute tolerance per pooled column: the quick demo's numbers are means over 72 generations per variant of
# tiny models trained for a few epochs on 2 cores; on the same versions and CPU features they repeat to 1e-6,
# across CPU instruction sets (AVX2 vs AVX-512) summation order changes training a little
TOLERANCE = {"acc": 0.10, "acc_max": 0.15, "is": 0.25, "ssim": 0.03, "judge_gt_acc": 0.05, "pixcorr": 0.05,
             "twoway_judge": 0.08}


def _pooled(summary) -> dict[str, dict[str, float]]:
    rows = summary[summary["subject"].astype(str) == "all"]
    out = {}
    for _, r in rows.iterrows():
        out[str(r["variant"])] = {c: float(r[c]) for c in TOLERANCE if c in r and r[c] == r[c]}
    return out


def results_block(summary, protocol: dict, command: str) -> str:
    """The README's results: what produced them, in one paragraph, then the ablation table and, when scored,
    the suite's table with its intervals and chance row."""
    data = protocol.get("data", {})
    ldm = protocol.get("ldm", {})
    head = (f"What `{command}` reports ({data.get('dataset', '?')}; subjects {', '.join(map(str, data.get('subjects', [])))}, "
            f"{data.get('n_trials', '?')} test trials, {ldm.get('samples_per_eeg', '?')} samples per trial; "
            f"{ldm.get('kind', '?')} LDM at {ldm.get('resolution', '?')} px). {protocol_line(protocol)}")
    gt = protocol.get("classifier", {}).get("gt_accuracy")
    if isinstance(gt, (int, float)) and math.isfinite(gt):
        head += f" The classifier's top-1 on the ground-truth test images: {100 * gt:.1f} %."
    suite = suite_table(summary, protocol)
    nets = protocol.get("suite", {}) or {}
    judged = "judge" in (nets.get("two_way") or {}) or "judge" in str((nets.get("fid") or {}).get("network", ""))
    note = ("; two-way identification and FID/KID on the judge CNN's pooled features: comparable only within this "
            "project" if judged else "")
    tail = ("\n\nThe field's suite (pooled; 95 % bootstrap interval over test trials in brackets" + note +
            "; chance: each generation against another trial's ground truth):\n\n" + suite) if suite else ""
    note = acc_note(protocol)
    return f"{head}\n\n{ablation_table(summary, protocol)}" + (f"\n\n{note}" if note else "") + tail


def make_reference(run_dir: str | Path, command: str) -> dict:
    """The reference record of an evaluated run."""
    summary, protocol = load_summary(run_dir), load_protocol(run_dir)
    return {"command": command, "pooled": _pooled(summary), "tolerance": TOLERANCE,
            "block": results_block(summary, protocol, command),
            "provenance": (protocol.get("provenance") or {}).get("evaluate")}


def save_reference(reference: dict, path: str | Path) -> Path:
    path = Path(path)
    write_text(path, json.dumps(reference, indent=1, sort_keys=True) + "\n")
    return path


def load_reference(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable reference ({exc.__class__.__name__})") from None


def check_against(run_dir: str | Path, reference: dict) -> list[str]:
    """Lines naming every pooled number of ``run_dir`` outside the reference's tolerance (empty: it matches);
    when any, a last line names what differs in software and hardware."""
    got = _pooled(load_summary(run_dir))
    tol = reference.get("tolerance", TOLERANCE)
    bad = []
    for variant, ref in reference["pooled"].items():
        if variant not in got:
            bad.append(f"{variant}: missing from the run")
            continue
        for col, want in ref.items():
            have = got[variant].get(col, float("nan"))
            if not abs(have - want) <= tol.get(col, 0.0):
                bad.append(f"{variant} {col}: {have:.4g}, reference {want:.4g} (tolerance ±{tol.get(col, 0.0)})")
    if bad:
        prov = (load_protocol(run_dir).get("provenance") or {}).get("evaluate") or {}
        diff = differences(reference.get("provenance") or {}, prov) if prov else ["this run records no provenance"]
        bad.append("differs from the reference's environment in: " + ("; ".join(diff) if diff else
                                                                     "nothing recorded (same versions and CPU features)"))
    return bad


def update_readme(readme: str | Path, block: str) -> bool:
    """Replace the block between the markers; True when the file changed. One clear error without markers."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise DataError(f"{readme}: no '{BEGIN}' ... '{END}' block to replace")
    new = pattern.sub(lambda _: f"{BEGIN}\n{block.strip()}\n{END}", text, count=1)
    if new != text:
        write_text(readme, new)
    return new != text


def readme_block(readme: str | Path) -> Optional[str]:
    """The README's current results block (between the markers), or None."""
    m = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), Path(readme).read_text(encoding="utf-8"), re.S)
    return m.group(1) if m else None
