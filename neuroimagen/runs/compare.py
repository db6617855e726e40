"""Two evaluated runs side by side, every number marked whose protocol differs: ``neuroimagen compare A B``.

A number is comparable only when it was produced the same way. Every metric column of ``summary.csv`` has a
*protocol card* (``protocol.json``'s ``cards``, written by ``evaluate``; for results written before cards
existed, derived from the protocol sections the metric depends on). :func:`compare_runs` puts the two summaries
side by side, one line per (subject, variant, metric), and marks each line whose cards differ, naming the keys
that differ. Software and hardware differences (provenance) are listed below the table: they do not make a
number incomparable, but they explain a difference in the last digits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional

import pandas as pd

from neuroimagen.provenance import differences
from neuroimagen.runs.reports import load_protocol, load_summary

# columns of summary.csv that are not numbers to compare
_KEYS = ("subject", "variant")
# protocol sections each metric depends on, by column prefix (longest prefix wins); used when protocol.json
# has no cards of its own
_SECTIONS = {
    "acc": ("data", "classifier", "acc", "ldm"),
    "judge_gt": ("data", "classifier"),
    "is": ("data", "classifier", "is", "ldm"),
    "ssim": ("data", "ssim", "ldm"),
    "": ("data", "ldm"),
}
# card entries that do not change a number: where files are (data.dataset names the files), how long it took,
# which machine
_VOLATILE = ("path", "seconds", "provenance", "warning", "eeg", "split_file")  # "dataset" keeps the file names


def _flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(doc, dict):
        out: dict[str, Any] = {}
        for k, v in doc.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: json.dumps(doc, sort_keys=True, default=str) if isinstance(doc, list) else doc}


def _keep(key: str) -> bool:
    return not any(part in _VOLATILE for part in key.split("."))


def metric_card(protocol: dict, metric: str) -> dict[str, Any]:
    """The flat protocol card of one summary column (``protocol['cards'][metric]`` when written)."""
    cards = protocol.get("cards") or {}
    if metric in cards:
        card = cards[metric]
    else:
        prefix = max((p for p in _SECTIONS if metric.startswith(p)), key=len)
        card = {s: protocol.get(s) for s in _SECTIONS[prefix]}
    return {k: v for k, v in _flatten(card).items() if _keep(k)}


def card_differences(card_a: dict, card_b: dict) -> list[str]:
    """Keys whose values differ between two flat cards (missing on one side counts), sorted."""
    return sorted(k for k in set(card_a) | set(card_b) if card_a.get(k) != card_b.get(k))


def _metrics(a: pd.DataFrame, b: pd.DataFrame) -> list[str]:
    """Numeric columns with a value in both runs (the loader fills the report's columns a run lacks with NaN)."""
    def num(df):
        return [c for c in df.columns if c not in _KEYS and pd.api.types.is_numeric_dtype(df[c]) and df[c].notna().any()]

    in_b = set(num(b))
    # an interval's bounds travel with their metric's row, not as metrics of their own
    return [c for c in num(a) if c in in_b and not c.endswith(("_lo", "_hi"))]


def compare_runs(run_a: str | Path, run_b: str | Path, subjects: Optional[Iterable[str]] = ("all",)) -> dict:
    """{'rows': [...], 'differing': {metric: [card keys]}, 'provenance': [lines], 'only_a'/'only_b': [...]}.

    One row per (subject, variant, metric) present in both runs: ``a``, ``b``, ``delta`` (b - a),
    ``comparable`` (False when the metric's cards differ) and, for a metric with an interval, ``a_ci`` / ``b_ci``
    (the ``<metric>_lo`` / ``_hi`` bounds of each run). ``subjects``: which subject rows (default the pooled
    ``all``; None for every subject).
    """
    sa, pa = load_summary(run_a), load_protocol(run_a)
    sb, pb = load_summary(run_b), load_protocol(run_b)
    metrics = _metrics(sa, sb)
    differing = {m: d for m in metrics if (d := card_differences(metric_card(pa, m), metric_card(pb, m)))}
    keep = None if subjects is None else {str(s) for s in subjects}
    ia = sa.set_index(list(_KEYS))
    ib = sb.set_index(list(_KEYS))
    rows = []
    for key in ia.index:
        if key not in ib.index or (keep is not None and key[0] not in keep):
            continue
        for m in metrics:
            va, vb = float(ia.at[key, m]), float(ib.at[key, m])
            row = {"subject": key[0], "variant": key[1], "metric": m, "a": va, "b": vb,
                   "delta": vb - va if math.isfinite(va) and math.isfinite(vb) else float("nan"),
                   "comparable": m not in differing}
            for side, frame in (("a", ia), ("b", ib)):  # the 95 % interval of each side, when both bounds exist
                if f"{m}_lo" in frame.columns and f"{m}_hi" in frame.columns:
                    row[f"{side}_ci"] = (float(frame.at[key, f"{m}_lo"]), float(frame.at[key, f"{m}_hi"]))
            rows.append(row)
    prov_a = (pa.get("provenance") or {}).get("evaluate") or {}
    prov_b = (pb.get("provenance") or {}).get("evaluate") or {}
    return {"rows": rows, "differing": differing,
            "provenance": differences(prov_a, prov_b) if prov_a and prov_b else ["provenance not recorded in both runs"],
            "only_a": [f"{s}/{v}" for s, v in ia.index if (s, v) not in ib.index],
            "only_b": [f"{s}/{v}" for s, v in ib.index if (s, v) not in ia.index]}


def _fmt(x: float, ci: Optional[tuple[float, float]] = None) -> str:
    if not math.isfinite(x):
        return "n/a"
    if ci is not None and all(math.isfinite(v) for v in ci):
        return f"{x:.4g} [{ci[0]:.4g}, {ci[1]:.4g}]"
    return f"{x:.4g}"


def format_comparison(result: dict, name_a: str, name_b: str) -> str:
    """The comparison as Markdown: a table (``‡`` = protocols differ) and the notes below it."""
    lines = ["| subject | variant | metric | A | B | B − A |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mark = "" if r["comparable"] else " ‡"
        lines.append(f"| {r['subject']} | {r['variant']} | {r['metric']}{mark} | {_fmt(r['a'], r.get('a_ci'))} | "
                     f"{_fmt(r['b'], r.get('b_ci'))} | {_fmt(r['delta'])} |")
    lines += ["", f"A = `{name_a}`, B = `{name_b}`; brackets: each run's 95 % bootstrap interval over test trials."]
    if result["differing"]:
        lines.append("‡ not comparable, the protocols differ:")
        lines += [f"- {m}: {', '.join(keys)}" for m, keys in result["differing"].items()]
    else:
        lines.append("Every metric was produced under the same protocol in both runs.")
    if result["provenance"]:
        lines.append(f"Software/hardware differences: {'; '.join(result['provenance'])}.")
    for side, name in (("only_a", name_a), ("only_b", name_b)):
        if result[side]:
            lines.append(f"Only in {name}: {', '.join(result[side])}.")
    return "\n".join(lines) + "\n"
