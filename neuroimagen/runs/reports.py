"""``report.md`` for a reconstruction run: the paper's tables and figures, each number with its protocol.

Reads what ``neuroimagen evaluate`` writes under ``RUN/results/``:

* ``per_sample.parquet`` — one row per generated image (subject, variant, item, sample, image paths...);
* ``summary.csv`` — ACC / IS / SSIM and the suite per (subject, variant) with their intervals, plus pooled rows
  with subject ``"all"``;
* ``protocol.json`` — how every number was produced (data, classifier, N-way, IS, SSIM, LDM, variants, the
  suite's networks, one card per number);
* ``tests.csv`` (optional) — the paired permutation tests between variants.

and writes ``RUN/report/report.md`` with, beside it, ``per_subject.png``, ``grid_<variant>.png`` (the
paper's Fig. 3: GT | saliency | samples) and ``comparison.png`` (Fig. 5 style: GT | sample 0 per variant).

Sections: header, ablation (Table 3 analogue), per subject (Table 2 analogue), judge, samples, the
guards of stages 1-3 (when ``run.json`` lists trained stages), protocol, then any extra sections
verbatim. Missing or NaN numbers print as ``n/a``. A missing image file draws a grey "missing" cell and
is counted in the report rather than aborting it: the ground-truth paths are absolute and may not
resolve on the machine that renders the report.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import textwrap
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import matplotlib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from neuroimagen.atomic import atomic_dir, atomic_path, write_text
from neuroimagen.errors import DataError, OutputError

PAPER_VARIANTS = ("I", "L", "B", "B+I", "L+I")  # the paper's numbering: 1=I, 2=L, 3=B, 4=B+I, 5=L+I
CONTROL_VARIANTS = ("oracle", "other-class")
VARIANT_ORDER = PAPER_VARIANTS + CONTROL_VARIANTS
PAPER_NUMBER = {v: i + 1 for i, v in enumerate(PAPER_VARIANTS)}

# Used only when protocol.json does not describe a variant.
DEFAULT_DESCRIPTIONS = {
    "I": "pixel-level saliency map only (no EEG semantics)",
    "L": "label-caption semantics from EEG, noise init (no saliency)",
    "B": "BLIP-caption semantics from EEG, noise init (no saliency)",
    "B+I": "saliency map + BLIP-caption semantics",
    "L+I": "saliency map + label-caption semantics (full NeuroImagen)",
    "oracle": "upper bound: ground-truth information in place of EEG decoding",
    "other-class": "control: variant L+I fed the EEG of a random trial of another class (chance is k/N)",
}

RESULTS = "results"
REPORT = "report"
_NA = "n/a"
_PER_SAMPLE_COLUMNS = ("subject", "variant", "item", "sample", "class_name", "image", "saliency", "gt")
_SUMMARY_REQUIRED = ("subject", "variant", "acc")
_SUMMARY_NUMERIC = ("n", "n_eeg", "acc", "acc_max", "acc_chance", "acc_n", "is", "is_std", "is_splits", "is_n",
                    "is_inception_v3", "is_inception_v3_std", "ssim", "ssim_std", "judge_gt_acc")
_SUMMARY_TEXT = ("flags",)  # text columns of summary.csv (variant flags: '' when none)
_IS_SUMMARY = ("is", "is_inception_v3")  # summary.csv's Inception Scores: the ACC classifier's, Inception-v3's
_WHOLE_SET = ("is", "is_std", "is_inception_v3", "is_inception_v3_std", "is_splits")
_CELL = 96  # px per image cell in the grids


# --------------------------------------------------------------------------------------------------
# Formatting


def is_missing(value: Any) -> bool:
    """True for None, NaN and infinities (anything that should print as ``n/a``)."""
    if value is None:
        return True
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def fmt_num(value: Any, spec: str = ".3f", scale: float = 1.0) -> str:
    """``format(value * scale, spec)``, or ``n/a`` when the value is missing or not a number."""
    if is_missing(value):
        return _NA
    try:
        return format(float(value) * scale, spec)
    except (TypeError, ValueError):
        return _NA


def _cell(text: Any) -> str:
    # A "|" would split the cell; newlines would end the row.
    return " ".join(str(text).split()).replace("|", "\\|")


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: Optional[str] = None) -> str:
    """A GitHub-flavoured markdown table.

    ``rows`` hold already-formatted cells (anything ``str()``-able; "|" is escaped). ``align`` is one
    character per column: ``l``, ``r`` or ``c`` (default: first column left, the others right).
    """
    headers = [_cell(h) for h in headers]
    align = align or ("l" + "r" * (len(headers) - 1))
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} characters for {len(headers)} columns")
    rule = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule[a] for a in align) + "|"]
    for row in rows:
        cells = [_cell(c) for c in row]
        if len(cells) != len(headers):
            raise ValueError(f"row has {len(cells)} cells for {len(headers)} columns: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _bold_best(cells: list[str], eligible: list[bool], lower: bool = False) -> list[str]:
    """Bold the largest (``lower``: the smallest) of the eligible cells, compared by the leading number as
    printed, so printed ties are all bold.

    Nothing is bolded when fewer than two eligible cells hold a number: a single variant is not "best".
    """
    values = {}
    for i, (c, ok) in enumerate(zip(cells, eligible)):
        if ok and c != _NA:
            try:
                values[i] = float(c.split(" ")[0])
            except ValueError:
                pass
    if len(values) < 2:
        return cells
    best = min(values.values()) if lower else max(values.values())
    return [f"**{c}**" if values.get(i) == best else c for i, c in enumerate(cells)]


def _natural(subject: str):
    s = str(subject)
    return (0, int(s), s) if s.isdigit() else (1, 0, s)


def _order_variants(present: Iterable[str]) -> list[str]:
    present = list(dict.fromkeys(str(v) for v in present))
    known = [v for v in VARIANT_ORDER if v in present]
    return known + sorted(v for v in present if v not in VARIANT_ORDER)


def _variant_label(v: str) -> str:
    return f"{PAPER_NUMBER[v]} ({v})" if v in PAPER_NUMBER else v


def _get(d: Any, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return default if d is None else d


def _show(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _NA
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


# --------------------------------------------------------------------------------------------------
# Loading


def _results_file(run_dir: Path, name: str) -> Path:
    path = Path(run_dir) / RESULTS / name
    if not path.is_file():
        raise DataError(f"{path}: not found; run `neuroimagen evaluate --run {run_dir}` first")
    return path


def load_summary(run_dir: str | os.PathLike):
    """``RUN/results/summary.csv`` as a DataFrame (subject and variant as str, the metrics as float)."""
    path = _results_file(Path(run_dir), "summary.csv")
    try:
        df = pd.read_csv(path, dtype={"subject": str, "variant": str, **{c: str for c in _SUMMARY_TEXT}}, keep_default_na=False,
                         na_values=["", "nan", "NaN", "n/a", "NA"])
    except Exception as exc:  # pandas raises a zoo of parser errors
        raise DataError(f"{path}: unreadable ({exc}); expected a CSV of aggregate scores") from exc
    missing = [c for c in _SUMMARY_REQUIRED if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected at least {list(_SUMMARY_REQUIRED)}")
    if df.empty:
        raise DataError(f"{path}: no rows; expected one row per (subject, variant)")
    df["subject"] = df["subject"].astype(str)
    df["variant"] = df["variant"].astype(str)
    for c in _SUMMARY_NUMERIC:
        df[c] = pd.to_numeric(df[c], errors="coerce") if c in df.columns else float("nan")
    for c in df.columns:
        if c not in ("subject", "variant", *_SUMMARY_TEXT) and c not in _SUMMARY_NUMERIC:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    for c in _SUMMARY_TEXT:
        df[c] = df[c].astype(object).where(df[c].notna(), "").astype(str) if c in df.columns else ""
    return df


def load_tests(run_dir: str | os.PathLike):
    """``RUN/results/tests.csv`` (the paired permutation tests between variants), or None for a run evaluated
    before the tests were written."""
    path = Path(run_dir) / RESULTS / "tests.csv"
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path, dtype={"subject": str, "a": str, "b": str, "metric": str}, keep_default_na=False,
                         na_values=["", "nan", "NaN"])
    except Exception as exc:  # pandas raises a zoo of parser errors
        raise DataError(f"{path}: unreadable ({exc}); expected a CSV of variant tests") from exc
    missing = [c for c in ("subject", "a", "b", "metric", "diff", "p_value", "n_trials") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected one row per (subject, pair, metric)")
    return df


def load_protocol(run_dir: str | os.PathLike) -> dict:
    """``RUN/results/protocol.json`` as a dict."""
    path = _results_file(Path(run_dir), "protocol.json")
    try:
        protocol = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc}); expected a JSON object describing the protocol") from exc
    if not isinstance(protocol, dict):
        raise DataError(f"{path}: expected a JSON object describing the protocol, got {type(protocol).__name__}")
    return protocol


def load_per_sample(run_dir: str | os.PathLike):
    """The columns of ``RUN/results/per_sample.parquet`` the report needs (not the probability vectors)."""
    path = _results_file(Path(run_dir), "per_sample.parquet")
    try:
        names = pq.read_schema(path).names
        missing = [c for c in _PER_SAMPLE_COLUMNS if c not in names]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; expected per-sample scores with "
                            f"{list(_PER_SAMPLE_COLUMNS)}")
        df = pd.read_parquet(path, columns=list(_PER_SAMPLE_COLUMNS))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: unreadable ({exc}); expected a Parquet file of per-sample scores") from exc
    for c in ("subject", "variant", "class_name", "image", "gt"):
        df[c] = df[c].astype(str)
    df["saliency"] = df["saliency"].fillna("").astype(str)
    df["item"] = df["item"].astype("int64")
    df["sample"] = df["sample"].astype("int64")
    return df


def load_results(run_dir: str | os.PathLike):
    """``(per_sample, summary, protocol)`` of a run; DataError naming the first missing/unreadable file."""
    return load_per_sample(run_dir), load_summary(run_dir), load_protocol(run_dir)


# --------------------------------------------------------------------------------------------------
# Tables


def _subjects(summary) -> list[str]:
    return sorted({s for s in summary["subject"] if s != "all"}, key=_natural)


def _pooled(summary, variant: str) -> dict:
    """The ``all`` row of a variant; without one, a single subject's row, else n-weighted means (IS n/a)."""
    rows = summary[summary["variant"] == variant]
    pooled = rows[rows["subject"] == "all"]
    if len(pooled):
        return pooled.iloc[0].to_dict()
    per = rows[rows["subject"] != "all"]
    if len(per) == 1:
        return per.iloc[0].to_dict()
    out = {"subject": "all", "variant": variant}
    for c in _SUMMARY_NUMERIC:
        vals = per[c].astype(float)
        w = per["n"].astype(float) if c != "acc_max" else per["n_eeg"].astype(float)
        ok = vals.notna() & w.notna()
        if c in ("n", "n_eeg", "is_n"):
            out[c] = float(vals.sum()) if vals.notna().any() else float("nan")
        elif c in _WHOLE_SET:
            out[c] = float("nan")  # a whole-set statistic: not recoverable from per-subject values
        elif ok.any() and float(w[ok].sum()) > 0:
            out[c] = float((vals[ok] * w[ok]).sum() / w[ok].sum())
        else:
            out[c] = float(vals.mean()) if vals.notna().any() else float("nan")
    return out


def _acc_over_subjects(summary, variant: str) -> tuple[float, float, int]:
    """(mean, sample std, number of subjects) of the per-subject ACC of a variant."""
    per = summary[(summary["variant"] == variant) & (summary["subject"] != "all")]["acc"].astype(float).dropna()
    if len(per) == 0:
        return float("nan"), float("nan"), 0
    std = float(np.std(per.to_numpy(), ddof=1)) if len(per) > 1 else float("nan")
    return float(per.mean()), std, len(per)


def _description(protocol: Optional[dict], v: str) -> str:
    return str(_get(protocol or {}, "variants", v, "description", default="") or DEFAULT_DESCRIPTIONS.get(v, ""))


def ablation_table(summary, protocol: Optional[dict] = None) -> str:
    """The Table 3 analogue: one row per variant (paper order), pooled over subjects, best of 1-5 bold."""
    variants = _order_variants(summary["variant"])
    iss = is_columns(summary, protocol)
    rows, eligible = [], []
    for v in variants:
        p = _pooled(summary, v)
        mean, std, n_subj = _acc_over_subjects(summary, v)
        if n_subj > 1:
            acc = f"{fmt_num(mean, '.1f', 100)} ± {fmt_num(std, '.1f', 100)}"
        else:
            acc = fmt_num(p.get("acc"), ".1f", 100)
        desc = _description(protocol, v)
        label = f"{_variant_label(v)}: {desc}" if desc else _variant_label(v)
        mark = flag_marker(p.get("flags"))
        rows.append([f"{label} {mark}" if mark else label, acc,
                     fmt_num(p.get("acc_max"), ".1f", 100), fmt_num(p.get("acc_chance"), ".1f", 100),
                     *[fmt_num(p.get(c), ".2f") for c, _ in iss], fmt_num(p.get("ssim"), ".3f"),
                     fmt_num(p.get("n"), ".0f")])
        eligible.append(v in PAPER_NUMBER)
    for col in (1, 2, *range(4, 5 + len(iss))):  # ACC, ACC max, every IS, SSIM: higher is better
        bolded = _bold_best([r[col] for r in rows], eligible)
        for r, c in zip(rows, bolded):
            r[col] = c
    headers = ["variant", "ACC (%)", "ACC max-of-samples (%)", "chance (%)", *[h for _, h in iss], "SSIM", "images"]
    table = format_table(headers, rows)
    note = flag_note(summary, protocol)
    return f"{table}\n\n{note}" if note else table


def flag_marker(flags: Any) -> str:
    """``⚠ collapsed`` / ``⚠ = other-class`` (both joined) for a summary row's ``flags``; ``''`` when none."""
    text = "" if is_missing(flags) else str(flags).strip()
    return " ".join(f"⚠ {f}" for f in text.split("; ") if f) if text else ""


def flag_note(summary, protocol: Optional[dict] = None) -> str:
    """The note under the ablation table when a variant is flagged (pooled or for a subject): what each flag
    means, and which subjects' rows fired; ``''`` when nothing is flagged."""
    if "flags" not in summary.columns:
        return ""
    hit = summary[summary["flags"].fillna("").astype(str) != ""]
    if not len(hit):
        return ""
    per: dict[str, list[str]] = {}
    for _, r in hit.iterrows():
        if r["subject"] != "all":
            per.setdefault(str(r["flags"]), []).append(f"{r['variant']} (subject {r['subject']})")
    thresholds = _get(protocol or {}, "flags", "thresholds", default={}) or {}
    is_tol = f" (judge IS < {thresholds['max_is']:g})" if "max_is" in thresholds else ""
    return (f"⚠ Flagged by the scoring reduction: 'collapsed' = the generations (nearly) all receive one class "
            f"distribution{is_tol}, one top-1 class, or do not vary; '= other-class' = no score tells the variant "
            f"from the other-class control (paired permutation tests, small differences)." +
            (" Per subject: " + "; ".join(f"{f}: {', '.join(v)}" for f, v in per.items()) + "." if per else "") +
            " Rule and evidence: results/protocol.json `flags`.")


def summary_table(run_dir: str | os.PathLike) -> str:
    """The ablation (Table 3 analogue) markdown table alone, from ``RUN/results/summary.csv``.

    Variant descriptions come from ``protocol.json`` when it exists (it is optional here).
    """
    summary = load_summary(run_dir)
    try:
        protocol = load_protocol(run_dir)
    except DataError:
        protocol = None
    return ablation_table(summary, protocol)


def main_variant(variants: Sequence[str]) -> Optional[str]:
    """``L+I`` if present, else the last present paper variant, else the first variant (or None)."""
    ordered = _order_variants(variants)
    if "L+I" in ordered:
        return "L+I"
    paper = [v for v in ordered if v in PAPER_NUMBER]
    return paper[-1] if paper else (ordered[0] if ordered else None)


def per_subject_table(summary, variant: str, protocol: Optional[dict] = None) -> str:
    """The Table 2 analogue for one variant: ACC / ACC max / IS (each network) / SSIM per subject, then the
    pooled row."""
    rows = []
    sel = summary[summary["variant"] == variant]
    subjects = _subjects(summary)
    iss = is_columns(summary, protocol)

    def cells(label: str, d: dict) -> list[str]:
        return [label, fmt_num(d.get("acc"), ".1f", 100), fmt_num(d.get("acc_max"), ".1f", 100),
                *[fmt_num(d.get(c), ".2f") for c, _ in iss], fmt_num(d.get("ssim"), ".3f"), fmt_num(d.get("n"), ".0f")]

    for s in subjects:
        r = sel[sel["subject"] == s]
        rows.append(cells(f"subj {s}", r.iloc[0].to_dict() if len(r) else {}))
    if len(subjects) != 1:
        rows.append(cells("all (pooled)", _pooled(summary, variant)))
    return format_table(["subject", "ACC (%)", "ACC max-of-samples (%)", *[h for _, h in iss], "SSIM", "images"], rows)


# the suite's columns in report order: (summary column or prefix, header, format, scale, higher is better)
_SUITE_COLUMNS = (("acc", "ACC (%)", ".1f", 100.0, True), ("pixcorr", "PixCorr", ".3f", 1.0, True),
                  ("ssim", "SSIM", ".3f", 1.0, True))
_TWO_WAY_NAMES = {"alexnet2": "AlexNet(2)", "alexnet5": "AlexNet(5)", "inception": "Inception", "clip": "CLIP",
                  "judge": "two-way (judge CNN features)"}
_DISTANCE_NAMES = {"effnet": "EffNet-B", "swav": "SwAV"}


def suite_columns(summary) -> list[tuple[str, str, str, float, bool]]:
    """(column, header, format, scale, higher is better) of the suite's numbers in ``summary``: ACC, PixCorr,
    SSIM, every two-way identification (%), every correlation distance, FID and KID; only those present."""
    present = [c for c in summary.columns if summary[c].notna().any()]
    out = [c for c in _SUITE_COLUMNS if c[0] in present and (c[0] != "ssim" or "pixcorr" in present)]
    for c in present:
        if c.startswith("twoway_") and not c.endswith(("_lo", "_hi", "_chance")):
            key = c[len("twoway_"):]
            out.append((c, f"{_TWO_WAY_NAMES.get(key, key)} (%)", ".1f", 100.0, True))
    for c in present:
        if c.startswith("dist_") and not c.endswith(("_lo", "_hi", "_chance")):
            key = c[len("dist_"):]
            out.append((c, f"{_DISTANCE_NAMES.get(key, key)} ↓", ".3f", 1.0, False))
    for c, h in (("fid", "FID ↓"), ("kid", "KID ↓")):
        if c in present:
            out.append((c, h, ".3f" if c == "kid" else ".2f", 1.0, False))
    return out


def _ci_cell(d: dict, col: str, spec: str, scale: float) -> str:
    value = fmt_num(d.get(col), spec, scale)
    lo, hi = d.get(f"{col}_lo"), d.get(f"{col}_hi")
    if value == _NA or is_missing(lo) or is_missing(hi):
        return value
    return f"{value} [{fmt_num(lo, spec, scale)}, {fmt_num(hi, spec, scale)}]"


def _chance_cell(summary, col: str, spec: str, scale: float) -> str:
    """The chance baseline of a column, pooled over variants: ``<col>_chance`` (ACC: ``acc_chance``)."""
    name = f"{col}_chance"
    if name not in summary.columns:
        return _NA
    vals = summary[summary["subject"] == "all"][name].astype(float).dropna()
    if not len(vals):
        vals = summary[name].astype(float).dropna()
    return fmt_num(float(vals.mean()) if len(vals) else None, spec, scale)


def suite_table(summary, protocol: Optional[dict] = None) -> Optional[str]:
    """The field's suite per variant, pooled over subjects, each number with its 95 % bootstrap interval over
    test trials, then the chance row and the best of the paper variants 1-5 bold; None without suite columns."""
    cols = suite_columns(summary)
    if not any(c[0] != "acc" for c in cols) or "pixcorr" not in summary.columns:
        return None
    variants = _order_variants(summary["variant"])
    rows, eligible = [], []
    for v in variants:
        p = _pooled(summary, v)
        rows.append([_variant_label(v), *[_ci_cell(p, c, spec, scale) for c, _, spec, scale, _ in cols]])
        eligible.append(v in PAPER_NUMBER)
    for j, (_, _, _, _, higher) in enumerate(cols, start=1):
        bolded = _bold_best([r[j] for r in rows], eligible, lower=not higher)
        for r, c in zip(rows, bolded):
            r[j] = c
    rows.append(["chance", *[_chance_cell(summary, c, spec, scale) for c, _, spec, scale, _ in cols]])
    return format_table(["variant", *[h for _, h, _, _, _ in cols]], rows)


def tests_table(tests, summary=None) -> Optional[str]:
    """The pooled paired permutation tests: one row per (pair, metric): the two means, their difference and
    the p-value; None without tests."""
    if tests is None or not len(tests):
        return None
    sel = tests[tests["subject"] == "all"]
    if not len(sel):
        return None
    names = {c: h for c, h, _, _, _ in suite_columns(summary)} if summary is not None else {}
    rows = []
    for _, t in sel.iterrows():
        scale = 100.0 if t["metric"] == "acc" or str(t["metric"]).startswith("twoway_") else 1.0
        spec = ".1f" if scale == 100.0 else ".3f"
        p = float(t["p_value"])
        rows.append([f"{t['a']} vs {t['b']}", names.get(t["metric"], t["metric"]), fmt_num(t.get("mean_a"), spec, scale),
                     fmt_num(t.get("mean_b"), spec, scale), fmt_num(t["diff"], "+" + spec, scale),
                     f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}", fmt_num(t["n_trials"], ".0f")])
    return format_table(["pair (a vs b)", "metric", "a", "b", "a − b", "p (two-sided)", "trials"], rows)


def _suite_networks_text(protocol: dict) -> str:
    suite = _get(protocol, "suite", default={}) or {}
    parts = []
    for section in ("two_way", "distance"):
        for key, net in (_get(suite, section, default={}) or {}).items():
            sha = _get(net, "weights_sha256")
            parts.append(f"{_TWO_WAY_NAMES.get(key) or _DISTANCE_NAMES.get(key) or key}: {_get(net, 'network')}"
                         f" `{_get(net, 'node')}`" + (f", weights sha256 {str(sha)[:12]}" if sha else ""))
    fid = _get(suite, "fid")
    if fid:
        parts.append(f"FID/KID: {_get(fid, 'network')} ({_get(fid, 'note')}); reference: {_get(fid, 'reference')}")
    return "; ".join(parts) if parts else "no feature network configured (eval.suite)"


def suite_section(run_dir: Path, summary, protocol: dict) -> list[str]:
    """The report's suite section: the table with intervals and chance, then the paired tests; [] without it."""
    table = suite_table(summary, protocol)
    if table is None:
        return []
    suite = _get(protocol, "suite", default={}) or {}
    md = ["## The field's suite (MindEye / ATM metrics)", "",
          "Pooled over subjects; every number is the mean over all generated images with its 95 % bootstrap "
          "interval over test trials in brackets (FID: recomputed per replicate; KID: no interval). Two-way "
          "identification in % (chance 50 %). ↓: lower is better. Bold: best of the paper variants 1-5.", "",
          table, "", *_acc_note_lines(protocol),
          f"Chance row: {_get(suite, 'chance', 'pixcorr_chance, ssim_chance', default='n/a')}; correlation "
          f"distances: {_get(suite, 'chance', 'dist_<net>_chance', default='n/a')}; ACC: k/N. Networks: "
          f"{_suite_networks_text(protocol)}. Two-way gallery: {_get(suite, 'gallery', default='n/a')}. "
          f"Intervals: {_get(suite, 'intervals', default='n/a')}.", ""]
    tests = tests_table(load_tests(run_dir), summary)
    if tests is not None:
        md += ["### Paired tests between variants", "",
               f"Pooled over subjects. {_get(suite, 'tests', default='paired permutation tests over test trials')}. "
               "Per-subject tests are in `results/tests.csv`.", "", tests, ""]
    return md


def with_embedding(table: pd.DataFrame) -> pd.DataFrame:
    """A retrieval table with its ``embedding`` column (a table written before it existed held only stage 3's
    caption embedding)."""
    return table if "embedding" in table.columns else table.assign(embedding="caption")


RETRIEVAL_TITLES = {"caption": "Retrieval from stage 3's caption embedding",
                    "clip_image": "Retrieval from the clip_image embedding (EEG aligned to CLIP image embeddings)"}


def retrieval_section(run_dir: Path) -> list[str]:
    """The report's retrieval sections from ``results/retrieval.csv`` / ``.json`` (``neuroimagen retrieval``), one per
    scored embedding (``caption``, ``clip_image``), pooled over subjects: EEG, the shuffled-EEG control and chance per
    (k, top); [] when the run has none."""
    csv, meta = Path(run_dir) / RESULTS / "retrieval.csv", Path(run_dir) / RESULTS / "retrieval.json"
    if not csv.is_file() or not meta.is_file():
        return []
    try:
        table = with_embedding(pd.read_csv(csv, dtype={"subject": str, "control": str, "embedding": str}))
        protocol = json.loads(meta.read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - pandas and json raise a zoo of errors
        raise DataError(f"{csv}: unreadable ({exc}); expected the table of `neuroimagen retrieval`") from exc
    md = []
    for emb in [e for e in RETRIEVAL_TITLES if e in set(table["embedding"])]:
        proto = (protocol.get("embeddings") or {}).get(emb) or protocol
        pooled = table[(table["subject"] == "all") & (table["embedding"] == emb)]
        rows = []
        for (k, top), g in pooled.groupby(["k", "top"], sort=True):
            acc = {str(c): float(v["accuracy"].iloc[0]) for c, v in g.groupby("control")}
            rows.append([f"{int(k)}-way top-{int(top)}", fmt_num(acc.get("eeg"), ".1f", 100),
                         fmt_num(acc.get("shuffled"), ".1f", 100), fmt_num(float(g["chance"].iloc[0]), ".1f", 100)])
        unit = "concepts" if emb == "caption" else "images"
        md += [f"## {RETRIEVAL_TITLES[emb]}", "",
               f"{_get(proto, 'what', default='')}; {_get(proto, 'note', default='')}. Gallery: "
               f"{_get(proto, 'gallery', default='?')} {unit} ({_get(proto, 'gallery_definition', default='')}); "
               f"{_get(proto, 'n_trials', default='?')} trials of the {_get(proto, 'split', default='?')} split; "
               f"{_get(proto, 'similarity', default='')}; {_get(proto, 'draws', default='?')} seeded distractor "
               f"draws per trial below the gallery size (seed {_get(proto, 'seed', default='?')}). Control: "
               f"{_get(proto, 'control', default='')}. Pooled over subjects; per subject in `results/retrieval.csv` "
               f"(embedding `{emb}`).",
               "", format_table(["retrieval", "EEG (%)", "shuffled EEG (%)", "chance (%)"], rows), ""]
    return md


def _loso_columns(table) -> list[tuple[str, str, str, float]]:
    """(column, header, format, scale) of the side-by-side table: ACC, PixCorr, SSIM and two-way identification
    where present (not withheld), else ACC and SSIM."""
    cols = [(c, h, spec, scale) for c, h, spec, scale, _ in suite_columns(table)
            if c in ("acc", "pixcorr", "ssim") or c.startswith("twoway_")]
    if not cols:
        cols = [(c, h, spec, scale) for c, h, spec, scale in (("acc", "ACC (%)", ".1f", 100.0), ("ssim", "SSIM", ".3f", 1.0))
                if c in table.columns and table[c].notna().any()]
    return cols


def _read_loso_csv(run_dir, name: str, text_column: str, what: str) -> Optional[pd.DataFrame]:
    """``results/<name>`` of a loso run (subject, protocol and ``text_column`` read as text), None when absent;
    an unreadable file is one DataError naming it and ``what`` was expected."""
    path = Path(run_dir) / RESULTS / name
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path, dtype={"subject": str, "protocol": str, text_column: str})
    except Exception as exc:  # noqa: BLE001 - pandas raises a zoo of errors
        raise DataError(f"{path}: unreadable ({exc}); expected {what}") from exc


def loso_table(run_dir: str | os.PathLike) -> Optional[str]:
    """Within subject and leave-one-subject-out side by side, per subject then pooled, for the main variant, from
    ``results/summary_loso.csv`` (each number with its bootstrap interval); None when the run has no folds."""
    table = _read_loso_csv(run_dir, "summary_loso.csv", "variant", "the table of the loso protocol")
    if table is None:
        return None
    main = main_variant(list(table["variant"]))
    sel = table[table["variant"] == main]
    cols = _loso_columns(sel)
    rows = []
    for s in [*_subjects(sel), "all"]:
        cells = [f"subj {s}" if s != "all" else "all (pooled)"]
        by = {p: sel[(sel["protocol"] == p) & (sel["subject"] == s)] for p in ("within", "loso")}
        d = {p: (r.iloc[0].to_dict() if len(r) else {}) for p, r in by.items()}
        cells.append(f"{fmt_num(d['within'].get('n_eeg'), '.0f')} / {fmt_num(d['loso'].get('n_eeg'), '.0f')}")
        for c, _, spec, scale in cols:
            cells += [_ci_cell(d["within"], c, spec, scale), _ci_cell(d["loso"], c, spec, scale)]
        rows.append(cells)
    headers = ["subject", "trials (within / LOSO)", *[f"{h} {p}" for _, h, _, _ in cols for p in ("within", "LOSO")]]
    return f"Variant {_variant_label(main)}.\n\n" + format_table(headers, rows)


def loso_retrieval_table(run_dir: str | os.PathLike, embedding: str = "caption") -> Optional[str]:
    """Retrieval top-1 / top-5 at the largest k, within vs LOSO per subject, of one embedding (``caption``,
    ``clip_image``) from ``results/retrieval_loso.csv``; None when the run has no such rows."""
    table = _read_loso_csv(run_dir, "retrieval_loso.csv", "control", "the retrieval table of the loso protocol")
    if table is None:
        return None
    table = with_embedding(table)
    eeg = table[(table["control"] == "eeg") & (table["embedding"].astype(str) == embedding)]
    if not len(eeg):
        return None
    k = int(eeg["k"].max())
    tops = sorted(int(t) for t in eeg[eeg["k"] == k]["top"].unique())
    rows = []
    for s in [*_subjects(eeg), "all"]:
        cells = [f"subj {s}" if s != "all" else "all (pooled)"]
        for top in tops:
            for p in ("within", "loso"):
                r = eeg[(eeg["protocol"] == p) & (eeg["subject"] == s) & (eeg["k"] == k) & (eeg["top"] == top)]
                cells.append(fmt_num(float(r["accuracy"].iloc[0]) if len(r) else None, ".1f", 100))
        rows.append(cells)
    chance = ", ".join(f"top-{t} {100 * t / k:.1f} %" for t in tops)
    headers = ["subject", *[f"{k}-way top-{t} (%) {p}" for t in tops for p in ("within", "LOSO")]]
    return format_table(headers, rows) + f"\n\nChance: {chance}. Every k and the shuffled-EEG control: " \
        "`results/retrieval_loso.csv`."


def loso_section(run_dir: str | os.PathLike) -> list[str]:
    """The report's within-vs-LOSO section; [] when the run has no leave-one-subject-out folds."""
    table = loso_table(run_dir)
    if table is None:
        return []
    md = ["## Within subject vs leave-one-subject-out", "",
          "Within: every stage trained on all subjects (their training trials), scored on each subject's test "
          "trials. LOSO (`eval.protocol: loso`): one fold per subject, `loso/sub-XX/`, every stage trained and "
          "selected on the other subjects' training and validation trials only, scored on the held-out subject's "
          "same test trials. Pooled LOSO: every fold's held-out trials together. Each number: mean with its 95 % "
          "bootstrap interval over test trials; n/a: withheld (see the suite notes) or not computed.", "",
          table, ""]
    for emb, title in RETRIEVAL_TITLES.items():
        retrieval = loso_retrieval_table(run_dir, emb)
        if retrieval is not None:
            md += [f"### {title}, within vs LOSO", "", retrieval, ""]
    return md


# --------------------------------------------------------------------------------------------------
# Protocol text


def _acc_classifier_is_label(protocol: Optional[dict]) -> str:
    """The header of the IS computed from the ACC classifier's probabilities, when protocol.json does not name it."""
    kind = _get(protocol or {}, "classifier", "kind")
    if kind == "judge":
        return "IS (judge CNN, not Inception-v3)"
    if kind is None:
        return "IS (network not recorded)"
    ident = str(_get(protocol or {}, "classifier", "identity", default="classifier"))
    arch = _get(protocol or {}, "classifier", "arch") or ident.split("@")[0].split(":")[-1]
    return f"IS ({arch} ACC classifier{'' if arch == 'inception_v3' else ', not Inception-v3'})"


def is_columns(summary, protocol: Optional[dict] = None) -> list[tuple[str, str]]:
    """(summary column, table header) of every Inception Score of the run, each header naming its network
    (from ``protocol.json``'s ``is.networks``): the ACC classifier's IS always, Inception-v3's when scored."""
    nets = _get(protocol or {}, "is", "networks", default={})
    out = [("is", _get(nets, "is", "label") or _acc_classifier_is_label(protocol))]
    for col in _IS_SUMMARY[1:]:
        if col in nets or (col in summary.columns and summary[col].notna().any()):
            out.append((col, _get(nets, col, "label") or "IS (Inception-v3)"))
    return out


def _is_classifier_text(protocol: dict) -> str:
    """Which network produced each IS, in one phrase."""
    nets = _get(protocol, "is", "networks", default={})
    if isinstance(nets, dict) and nets:
        return "; ".join(f"{_get(d, 'label', default=c)} computed with {_get(d, 'network', default='?')}"
                         for c, d in nets.items())
    kind = _get(protocol, "classifier", "kind")
    ident = _get(protocol, "classifier", "identity", default="the evaluation classifier")
    if kind == "judge":
        return f"IS computed with the judge `{ident}`, not Inception-v3 (not comparable with the paper's IS)"
    return f"IS computed with `{ident}` ({kind or 'kind not recorded'}), not Inception-v3"


def _is_short_text(protocol: dict) -> str:
    """The IS headers of the run (each naming its network), or the legacy one-phrase description."""
    nets = _get(protocol, "is", "networks", default={})
    if isinstance(nets, dict) and nets:
        return " and ".join(str(_get(d, "label", default=c)) for c, d in nets.items())
    return _is_classifier_text(protocol)


def _is_splits_text(protocol: dict) -> str:
    rule = _get(protocol, "is", "split_rule")
    if rule:
        return f"{rule}, after a seeded shuffle (seed {_show(_get(protocol, 'is', 'seed'))})"
    return f"{_show(_get(protocol, 'is', 'splits', default='?'))} splits"


def protocol_line(protocol: dict) -> str:
    """One line: how ACC, IS and SSIM were computed, on which data."""
    acc = _get(protocol, "acc", default={})
    n = _get(acc, "n_eff", default=_get(acc, "n", default="?"))
    return (f"ACC = {n}-way top-{_get(acc, 'k', default='?')} over {_get(acc, 'trials', default='?')} trials "
            f"(seed {_get(acc, 'seed', default='?')}), true class = the judge's top-1 on the GT image; "
            f"{_is_short_text(protocol)} over all images of a group, {_is_splits_text(protocol)}; "
            f"SSIM {_get(protocol, 'ssim', 'convention', default='?')} at "
            f"{_get(protocol, 'ssim', 'resolution', default='?')} px; data "
            f"{_get(protocol, 'data', 'dataset', default='?')}, {_get(protocol, 'data', 'split', default='?')} split.")


def acc_note(protocol: Optional[dict]) -> Optional[str]:
    """The one line said wherever ACC appears when evaluate withheld it (``protocol['acc']['unavailable']``:
    the classifier's classes do not cover the evaluated concepts), else None."""
    why = _get(protocol or {}, "acc", "unavailable")
    return f"> **ACC n/a:** {_cell(why)}" if why else None


def _acc_note_lines(protocol: Optional[dict]) -> list[str]:
    note = acc_note(protocol)
    return [note, ""] if note else []


def _gt_accuracy_text(clf: Any) -> str:
    """The classifier's top-1 accuracy on the GT images, ``85.0 %``, or ``n/a (<why>)`` when the classifier's
    label space could not be compared with the dataset's labels."""
    value = _get(clf, "gt_accuracy")
    if is_missing(value) and _get(clf, "gt_accuracy_unavailable"):
        return f"{_NA} ({_get(clf, 'gt_accuracy_unavailable')})"
    return f"{fmt_num(value, '.1f', 100)} %"


def _kv_list(d: Any) -> list[str]:
    if not isinstance(d, dict) or not d:
        return ["- not recorded"]
    return [f"- {k}: {_show(v)}" for k, v in d.items()]


def protocol_section(protocol: dict) -> list[str]:
    acc = _get(protocol, "acc", default={})
    clf = _get(protocol, "classifier", default={})
    ldm = _get(protocol, "ldm", default={})
    out = ["## Protocol", "", "Every number above was produced as follows (from `results/protocol.json`).", "",
           "**Data and split**", ""]
    out += _kv_list(_get(protocol, "data"))
    out += ["", "**Classifier (judge of ACC and IS)**", "",
            f"- identity: `{_show(_get(clf, 'identity'))}`", f"- kind: {_show(_get(clf, 'kind'))}",
            f"- input size: {_show(_get(clf, 'input_size'))} px", f"- classes: {_show(_get(clf, 'num_classes'))}",
            f"- top-1 accuracy on GT test images: {_gt_accuracy_text(clf)}"]
    extra = {k: v for k, v in (clf.items() if isinstance(clf, dict) else [])
             if k not in ("identity", "kind", "input_size", "num_classes", "gt_accuracy", "gt_accuracy_unavailable")}
    out += _kv_list(extra) if extra else []
    out += ["", "**N-way top-k ACC** (MinD-Vis protocol)", "",
            f"- N = {_show(_get(acc, 'n'))} requested, N = {_show(_get(acc, 'n_eff'))} effective; "
            f"k = {_show(_get(acc, 'k'))}; chance = k/N",
            f"- trials per image: {_show(_get(acc, 'trials'))}; seed: {_show(_get(acc, 'seed'))}",
            "- true class: the classifier's top-1 on the ground-truth image (not the dataset label); "
            "distractors: N-1 other classes drawn uniformly per trial",
            "- ACC = mean over generated images of the per-image hit rate; "
            "ACC max-of-samples = mean over EEG trials of the best sample's hit rate"]
    if _get(acc, "warning"):
        out.append(f"- **Warning:** {_get(acc, 'warning')}")
    if _get(acc, "unavailable"):
        out.append(f"- **Not reported:** {_get(acc, 'unavailable')} (withheld: {_show(_get(acc, 'withheld'))})")
    nets = _get(protocol, "is", "networks", default={})
    net_lines = ([f"- {_show(_get(d, 'label', default=c))} (summary.csv `{c}`): {_show(_get(d, 'network'))}"
                  for c, d in nets.items()] if isinstance(nets, dict) and nets else
                 [f"- {_is_classifier_text(protocol)}", f"- note: {_show(_get(protocol, 'is', 'classifier_note'))}"])
    out += ["", "**Inception Score**", "", *net_lines,
            f"- splits: {_is_splits_text(protocol)}; over all generated images of a (subject, variant) group, "
            "reduced once; N and the split count per group: summary.csv `is_n`, `is_splits`",
            *([f"- order: {_get(protocol, 'is', 'permutation')}"] if _get(protocol, "is", "permutation") else []),
            "", "**SSIM**", "",
            f"- convention: {_show(_get(protocol, 'ssim', 'convention'))}",
            f"- resolution: {_show(_get(protocol, 'ssim', 'resolution'))} px",
            "- raw mean SSIM per (generated, ground-truth) pair",
            "", "**Latent diffusion (img2img)**", "",
            f"- kind: {_show(_get(ldm, 'kind'))}; identity: `{_show(_get(ldm, 'identity'))}`",
            f"- strength: {_show(_get(ldm, 'strength'))}; guidance scale: {_show(_get(ldm, 'guidance_scale'))}; "
            f"inference steps: {_show(_get(ldm, 'num_inference_steps'))}",
            f"- samples per EEG: {_show(_get(ldm, 'samples_per_eeg'))}; resolution: {_show(_get(ldm, 'resolution'))} px",
            "", "**Variants**", ""]
    variants = _get(protocol, "variants", default={})
    if isinstance(variants, dict) and variants:
        rows = []
        for v in _order_variants(variants):
            d = variants[v] if isinstance(variants[v], dict) else {}
            rows.append([v, PAPER_NUMBER.get(v, "–"), _show(d.get("saliency")), _show(d.get("semantics")),
                         _show(d.get("eeg")), _show(d.get("init")), _show(d.get("description"))])
        out.append(format_table(["variant", "paper #", "saliency", "semantics", "EEG", "init", "description"],
                                rows, align="lcccccl"))
    else:
        out.append("- not recorded")
    return out


# --------------------------------------------------------------------------------------------------
# Figures


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def plot_per_subject(summary, path: Path) -> Path:
    """Grouped bars of ACC (dashed chance line) and SSIM per subject × variant."""
    variants = _order_variants(summary["variant"])
    groups = _subjects(summary)
    if len(groups) != 1:
        groups = groups + ["all"]
    x = np.arange(len(groups))
    width = 0.8 / max(len(variants), 1)
    fig = Figure(figsize=(max(7.0, 1.4 * len(groups) + 4), 3.8))
    axes = fig.subplots(1, 2)
    for ax, col, scale, label in ((axes[0], "acc", 100.0, "ACC (%)"), (axes[1], "ssim", 1.0, "SSIM")):
        for j, v in enumerate(variants):
            vals = []
            for s in groups:
                r = summary[(summary["variant"] == v) & (summary["subject"] == s)]
                vals.append(float(r[col].iloc[0]) * scale if len(r) else float("nan"))
            ax.bar(x + (j - (len(variants) - 1) / 2) * width, vals, width, label=_variant_label(v),
                   color=matplotlib.colormaps["tab10"](j % 10))
        ax.set_xticks(x, [f"subj {s}" if s != "all" else "all" for s in groups], fontsize=8)
        ax.set_ylabel(label)
        ax.set_title(f"{label} per subject and variant", fontsize=9)
    chance = summary["acc_chance"].astype(float).dropna()
    if len(chance):
        axes[0].axhline(float(chance.median()) * 100, color="k", ls="--", lw=1, label="chance (k/N)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return _save(fig, path)


def _thumb(path: Path, cell: int):
    """An image scaled to fit a cell (aspect kept, centred on white), as uint8 (cell, cell, 3); None if unreadable."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = cell / max(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    except (OSError, ValueError):
        return None
    out = np.full((cell, cell, 3), 255, np.uint8)
    a = np.asarray(im)
    y0, x0 = (cell - a.shape[0]) // 2, (cell - a.shape[1]) // 2
    out[y0:y0 + a.shape[0], x0:x0 + a.shape[1]] = a
    return out


def _mosaic(cells: list[list[Optional[Path]]], col_titles: list[str], row_titles: list[str], title: str,
            path: Path, framed_cols: Sequence[int] = (0,), missing: Optional[list[str]] = None) -> Path:
    """Draw a rows × cols image grid as one picture with titles (fast: one imshow, not one axes per cell).

    A cell that is ``None`` is left blank ("none"); a path that cannot be read is a grey "missing" cell
    (its path is appended to ``missing``). Columns in ``framed_cols`` get a red frame, as in the paper.
    """
    n_rows, n_cols = len(cells), len(col_titles)
    pad, cell = 6, _CELL
    h, w = n_rows * cell + (n_rows + 1) * pad, n_cols * cell + (n_cols + 1) * pad
    canvas = np.full((h, w, 3), 255, np.uint8)  # (H, W, 3)
    notes = []
    for r, row in enumerate(cells):
        for c, p in enumerate(row):
            y, x = pad + r * (cell + pad), pad + c * (cell + pad)
            if p is None:
                notes.append((x, y, "none"))
                continue
            img = _thumb(p, cell)
            if img is None:
                canvas[y:y + cell, x:x + cell] = 225
                notes.append((x, y, "missing"))
                if missing is not None:
                    missing.append(str(p))
            else:
                canvas[y:y + cell, x:x + cell] = img
    dpi, left, top = 100, 150, 48
    fig = Figure(figsize=((w + left) / dpi, (h + top) / dpi), dpi=dpi)
    ax = fig.add_axes((left / (w + left), 0, w / (w + left), h / (h + top)))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for x, y, text in notes:
        ax.text(x + cell / 2, y + cell / 2, text, ha="center", va="center", fontsize=7, color="0.45")
    for c, t in enumerate(col_titles):
        ax.text(pad + c * (cell + pad) + cell / 2, -3, t, ha="center", va="bottom", fontsize=7, clip_on=False)
    for r, t in enumerate(row_titles):
        ax.text(-6, pad + r * (cell + pad) + cell / 2, t, ha="right", va="center", fontsize=7, clip_on=False)
    for c in framed_cols:
        for r in range(n_rows):
            if cells[r][c] is not None:
                ax.add_patch(Rectangle((pad + c * (cell + pad) - 2, pad + r * (cell + pad) - 2), cell + 3, cell + 3,
                                       fill=False, edgecolor="red", lw=1.5))
    fig.text(0.01, 1 - 4 / (h + top), textwrap.shorten(title, max(20, (w + left) // 6)), ha="left", va="top",
             fontsize=8)
    return _save(fig, path)


def pick_trials(per_sample, n: int) -> list[tuple[str, int]]:
    """The first ``n`` distinct (subject, item) EEG trials, sorted by subject (numerically when it can) then item."""
    pairs = {(str(s), int(i)) for s, i in zip(per_sample["subject"], per_sample["item"])}
    return sorted(pairs, key=lambda p: (_natural(p[0]), p[1]))[:max(int(n), 0)]


def _resolve(run_dir: Path, rel: str) -> Optional[Path]:
    if not rel or rel in ("nan", "None"):
        return None
    p = Path(rel)
    return p if p.is_absolute() else run_dir / p


def _file_name(variant: str) -> str:
    return "grid_" + re.sub(r"[^A-Za-z0-9+_.-]", "_", variant) + ".png"


def sample_figures(run_dir: Path, per_sample, out_dir: Path, trials: list[tuple[str, int]],
                   variants: list[str], missing: list[str],
                   protocol: Optional[dict] = None) -> tuple[dict[str, Path], Optional[Path]]:
    """``grid_<variant>.png`` per variant (GT | saliency | samples) and ``comparison.png`` (GT | sample 0 each)."""
    wanted = set(trials)
    per_sample = per_sample[[(s, int(i)) in wanted for s, i in zip(per_sample["subject"], per_sample["item"])]]
    by_trial = {k: g for k, g in per_sample.groupby(["subject", "item", "variant"], sort=False)}
    any_row = {(s, i): g.iloc[0] for (s, i), g in per_sample.groupby(["subject", "item"], sort=False)}
    row_titles = [textwrap.fill(str(any_row[t]["class_name"]), 22) + f"\nsubj {t[0]} · item {t[1]}" for t in trials]
    gts = [_resolve(run_dir, str(any_row[t]["gt"])) for t in trials]
    grids = {}
    for v in variants:
        rows_v = per_sample[per_sample["variant"] == v]
        n_samples = int(rows_v["sample"].max()) + 1 if len(rows_v) else 0
        cells = []
        for t, gt in zip(trials, gts):
            g = by_trial.get((t[0], t[1], v))
            sal, samples = None, [None] * n_samples
            if g is not None:
                g = g.sort_values("sample")
                sal = next((_resolve(run_dir, s) for s in g["saliency"] if s), None)
                for smp, img in zip(g["sample"], g["image"]):
                    samples[int(smp)] = _resolve(run_dir, img)
            cells.append([gt, sal] + samples)
        titles = ["GT", "saliency"] + [f"sample {k}" for k in range(n_samples)]
        desc = _description(protocol, v)
        grids[v] = _mosaic(cells, titles, row_titles, f"variant {_variant_label(v)}" + (f": {desc}" if desc else ""),
                           out_dir / _file_name(v), missing=missing)
    comparison = None
    if variants:
        cells = []
        for t, gt in zip(trials, gts):
            row = [gt]
            for v in variants:
                g = by_trial.get((t[0], t[1], v))
                first = g[g["sample"] == g["sample"].min()] if g is not None else None
                row.append(_resolve(run_dir, str(first["image"].iloc[0])) if first is not None else None)
            cells.append(row)
        comparison = _mosaic(cells, ["GT"] + [_variant_label(v) for v in variants], row_titles,
                             "sample 0 of each variant for the same EEG trials", out_dir / "comparison.png",
                             missing=missing)
    return grids, comparison


# --------------------------------------------------------------------------------------------------
# Stages 1-3: their guards (from <run>/<stage>/metrics.json)


def _eeg_control(m: dict) -> str:
    """The shuffled-EEG control of a stage's metrics, as one cell."""
    g = _get(m, "guards", "collapsed", default={})
    if g:
        return (f"SSIM {fmt_num(g.get('ssim'))} vs {fmt_num(g.get('ssim_shuffled'))} shuffled (gain "
                f"{fmt_num(g.get('condition_gain'), '.4f')} ± {fmt_num(g.get('condition_gain_se'), '.4f')}); pixel std "
                f"across EEG {fmt_num(g.get('spread_conditions'), '.4f')}, across z {fmt_num(g.get('spread_z'), '.4f')}")
    if "val_nearest_class_shuffled" in m:
        return (f"nearest-class {fmt_num(m.get('val_nearest_class_acc'))} vs "
                f"{fmt_num(m.get('val_nearest_class_shuffled'))} shuffled")
    return "—"


def stage_guard_section(run_dir: str | os.PathLike) -> list[str]:
    """``## Stages 1-3: guards``: per trained stage (``run.json``), the selection metric trained vs untrained, the
    best epoch, the shuffled-EEG control and the guards that fired (``stages.stage_guards``); ``[]`` without
    ``run.json`` or finished stages. Unreadable metrics files print as ``n/a``."""
    run_dir = Path(run_dir)
    try:
        stages = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("stages", {})
    except (OSError, ValueError, AttributeError):
        return []
    rows, warnings = [], []
    for name, entry in stages.items():
        path = _resolve(run_dir, str(_get(entry, "metrics", default="")))
        try:
            m = json.loads(path.read_text(encoding="utf-8")) if path is not None else {}
        except (OSError, ValueError):
            m = {}
        learn = _get(m, "guards", "did_not_learn", default={})
        fired = _get(m, "guards", "fired", default=None)
        rows.append([name, f"{_show(learn.get('metric'))} ({_show(learn.get('mode'))})", fmt_num(learn.get("best"), ".4f"),
                     fmt_num(learn.get("untrained"), ".4f"),
                     f"{m['best_epoch'] + 1}/{m.get('epochs', _NA)}" if isinstance(m.get("best_epoch"), int) else _NA,
                     _eeg_control(m), "not recorded" if fired is None else (", ".join(fired) or "ok")])
        warnings += [f"> **Warning ({name}: {k.replace('_', ' ')}):** {_get(m, 'guards', k, 'reason', default='')}"
                     for k in fired or []]
    if not rows:
        return []
    return ["## Stages 1-3: guards", "",
            "Validation split. did not learn: the selection metric is no better than the untrained model's, or no "
            "later epoch beat the first validated one; collapsed (saliency): G's images do not depend on the EEG (SSIM "
            "with the true EEG features not above SSIM with another item's, or pixel spread across EEG near 0 or "
            "under a tenth of the spread across z); ignores eeg (semantic): the nearest-class rate does not beat the "
            "same rate with the EEG permuted across trials.", "",
            format_table(["stage", "selected on", "trained", "untrained", "best epoch", "shuffled-EEG control",
                          "guards fired"], rows, align="llrrrll"), ""] + [line for w in warnings for line in (w, "")]


# --------------------------------------------------------------------------------------------------
# The report


def write_report(run_dir: str | os.PathLike, *, title: Optional[str] = None,
                 extra_sections: Optional[list[str]] = None, grid_items: int = 4) -> Path:
    """Write ``RUN/report/report.md`` and its figures; return the path of ``report.md``.

    Raises DataError (one line) when a results file is missing or unreadable. The report directory is
    built beside ``RUN/report`` and swapped in by one rename, so a failed write (a full disk) leaves the
    previous report whole, or none, never a new ``report.md`` with old figures or the reverse.
    """
    run_dir = Path(run_dir)
    per_sample, summary, protocol = load_results(run_dir)
    for stale in run_dir.glob(f"{REPORT}.partial-*"):  # the staging directory of an interrupted report
        shutil.rmtree(stale, ignore_errors=True)
    final = run_dir / REPORT
    with atomic_dir(final, overwrite=True) as out_dir:
        try:
            _compose_report(run_dir, out_dir, per_sample, summary, protocol, title, extra_sections, grid_items)
        except OutputError as exc:  # name the report's own path, not its staging directory
            raise OutputError(str(exc).replace(str(out_dir), str(final))) from exc
    return final / "report.md"


def _compose_report(run_dir: Path, out_dir: Path, per_sample, summary, protocol, title: Optional[str],
                    extra_sections: Optional[list[str]], grid_items: int) -> Path:
    variants = _order_variants(list(summary["variant"]) + list(per_sample["variant"]))
    subjects = _subjects(summary)
    main = main_variant(list(summary["variant"]))
    clf = _get(protocol, "classifier", default={})
    acc = _get(protocol, "acc", default={})
    ldm = _get(protocol, "ldm", default={})
    n_trials = len({(s, i) for s, i in zip(per_sample["subject"], per_sample["item"])})

    md = [f"# {title or 'NeuroImagen reconstruction report'}", "",
          f"Run `{run_dir}`: {len(per_sample)} generated images from {n_trials} EEG trials of "
          f"{len(subjects)} subject(s) ({', '.join(subjects) or _NA}); variants "
          f"{', '.join(_variant_label(v) for v in variants) or _NA}; LDM {_show(_get(ldm, 'kind'))} "
          f"`{_show(_get(ldm, 'identity'))}`, {_show(_get(ldm, 'samples_per_eeg'))} samples per EEG "
          f"at {_show(_get(ldm, 'resolution'))} px; data: {_show(_get(protocol, 'data', 'dataset'))}, "
          f"{_show(_get(protocol, 'data', 'split'))} split.", "",
          f"Protocol: {protocol_line(protocol)}", ""]
    if _get(acc, "warning"):
        md += [f"> **Warning (N-way ACC):** {_get(acc, 'warning')}", ""]

    # Ablation ---------------------------------------------------------------------------------
    n_subj = len(subjects)
    md += ["## Ablation (Table 3 analogue)", "",
           "Paper numbering: 1 = I, 2 = L, 3 = B, 4 = B+I, 5 = L+I (B: BLIP-caption semantics, L: label-caption "
           "semantics, I: pixel-level saliency map); oracle and other-class are controls (other-class: variant L+I "
           "fed the EEG of a random trial of another class, expected at or below chance; chance is k/N). Pooled over "
           "subjects.", "",
           ablation_table(summary, protocol), "",
           (f"ACC: mean ± sample standard deviation (ddof=1) over the {n_subj} subjects' ACC. " if n_subj > 1 else
            "ACC: mean over generated images. ")
           + "ACC max-of-samples: mean over EEG trials of the best sample. chance = k/N. IS and SSIM: over all "
           "images of the variant (pooled); each IS names its network. Bold: best of the paper variants 1-5 per "
           "column. Paper (EEG-ImageNet, Inception-v3 IS, ViT ACC): variant 5 ACC 85.6 %, IS 33.50.", "",
           *_acc_note_lines(protocol)]

    # Suite ----------------------------------------------------------------------------------------
    md += suite_section(run_dir, summary, protocol)
    md += retrieval_section(run_dir)
    md += loso_section(run_dir)

    # Per subject ------------------------------------------------------------------------------
    md += ["## Per subject (Table 2 analogue)", ""]
    if main is not None:
        md += [f"Variant {_variant_label(main)}.", "", per_subject_table(summary, main, protocol), "",
               *_acc_note_lines(protocol)]
    plot_per_subject(summary, out_dir / "per_subject.png")
    md += ["![ACC and SSIM per subject and variant](per_subject.png)", "",
           "Left: ACC per subject × variant (dashed: chance k/N); right: SSIM.", ""]

    # Judge ------------------------------------------------------------------------------------
    md += ["## Judge", "",
           f"Classifier `{_show(_get(clf, 'identity'))}` (kind {_show(_get(clf, 'kind'))}, "
           f"{_show(_get(clf, 'num_classes'))} classes, input {_show(_get(clf, 'input_size'))} px); "
           f"top-1 accuracy on the ground-truth test images: {_gt_accuracy_text(clf)}.", "",
           "ACC only means something when the judge classifies the ground-truth images well: the \"true\" class "
           "of the N-way protocol is the judge's top-1 on the GT image, so a judge that misreads the GT images "
           "scores agreement with its own mistakes, not semantic fidelity.", ""]
    judge_rows = []
    for s in subjects + (["all"] if n_subj != 1 else []):
        vals = summary[summary["subject"] == s]["judge_gt_acc"].astype(float).dropna()
        judge_rows.append([f"subj {s}" if s != "all" else "all (pooled)",
                           fmt_num(vals.iloc[0] if len(vals) else None, ".1f", 100)])
    md += [format_table(["subject", "judge top-1 on GT images (%)"], judge_rows), "", *_acc_note_lines(protocol)]
    gt_acc = summary["judge_gt_acc"].astype(float).dropna()
    if len(gt_acc) and float(gt_acc.min()) < 0.5:
        md += [f"> **Caution:** the judge's top-1 accuracy on GT images is as low as {float(gt_acc.min()) * 100:.1f} % "
               "for some subject; read ACC with care.", ""]

    # Samples ----------------------------------------------------------------------------------
    md += ["## Samples", ""]
    trials = pick_trials(per_sample, grid_items)
    missing: list[str] = []
    if trials:
        sample_variants = _order_variants(per_sample["variant"])
        grids, comparison = sample_figures(run_dir, per_sample, out_dir, trials, sample_variants, missing, protocol)
        md += [f"The first {len(trials)} EEG trials by (subject, item). Columns: ground truth (red frame) | saliency "
               "map decoded from EEG (\"none\" when the variant uses none) | samples, as in the paper's Fig. 3.", ""]
        for v, p in grids.items():
            md += [f"### Variant {_variant_label(v)}", "", f"![samples of variant {v}]({p.name})", ""]
        if comparison is not None:
            md += ["### All variants", "", "Ground truth, then sample 0 of each variant (paper Fig. 5 style).", "",
                   f"![comparison of variants]({comparison.name})", ""]
        if missing:
            md += [f"> **Note:** {len(missing)} image file(s) could not be read and are drawn as grey \"missing\" "
                   f"cells (first: `{missing[0]}`).", ""]
    else:
        md += ["No generated images in `results/per_sample.parquet`.", ""]

    md += stage_guard_section(run_dir)  # stages 1-3, when the run trained them here

    # Protocol ---------------------------------------------------------------------------------
    md += protocol_section(protocol) + [""]

    for section in extra_sections or []:
        md += [section, ""]
    return write_text(out_dir / "report.md", "\n".join(md).rstrip("\n") + "\n")
