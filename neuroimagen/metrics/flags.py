"""Variant-level flags of the scoring reduction: a variant whose generations collapsed, or whose scores are the
other-class control's.

:func:`variant_flags` reads the per-image table (one row per generated image) and, per (subject, variant) group
and per variant over all subjects (``subject == 'all'``), fires

* ``collapsed`` when the generations (nearly) all receive one class distribution or (nearly) do not vary:
  the judge's Inception Score over the whole group, ``exp(mean_i KL(p_i || mean_j p_j))`` (one split, so the
  group size does not bias it), is below ``max_is``; or the judge's top-1 puts at least ``max_mode_share`` of
  the generations in one class; or the spread of the generations' judge features (root mean per-dimension
  variance) is under ``min_spread`` times the spread of the ground truths of the same trials. A low entropy of
  each image's own distribution is a confident judge, not a collapse: what a collapse removes is the spread of
  the distributions across images, which the IS measures.
* ``= other-class`` when the variant cannot be told from the control (``control``: the L+I pipeline fed the EEG
  of another class's trial) on any score: for every score the table holds among ACC (``acc_hit``), PixCorr and
  two-way identification, the paired permutation test of the per-trial means (:func:`~neuroimagen.metrics.
  summary.compare_variants`) gives p > ``p_value`` AND ``|mean(variant - control)|`` <= that score's tolerance
  (ACC: ``acc_tolerance`` x chance, chance = ``top_k`` / N of the group; PixCorr and two-way: ``tolerances``).
  The control of a working pipeline sits below chance (it is steered towards another class), so a variant at
  chance typically differs from it by about one chance level: the tolerance lets such a variant fire, while a
  variant that beats the control by more is left alone even when a small test split leaves p above 0.05.

Pure functions of the DataFrame (numpy / pandas; the permutation test from :mod:`neuroimagen.metrics.stats`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from neuroimagen.metrics.summary import Statistics, compare_variants

COLLAPSED = "collapsed"
EQUALS_CONTROL = "= other-class"


def _default_tolerances() -> dict[str, float]:
    return {"pixcorr": 0.1, "twoway_": 0.15}


@dataclass(frozen=True)
class FlagRules:
    """The thresholds of :func:`variant_flags` (recorded in ``protocol.json`` with the rule)."""

    max_is: float = 1.05
    max_mode_share: float = 0.95
    min_spread: float = 0.05
    control: str = "other-class"
    p_value: float = 0.05
    # |mean difference| to the control at or under which a score counts as equal: ACC in units of its chance
    # (top_k / N), the others absolute (``twoway_`` covers every two-way identification column)
    acc_tolerance: float = 1.0
    top_k: int = 1
    tolerances: dict = field(default_factory=_default_tolerances)
    n_perm: int = 10_000
    seed: int = 0

    def tolerance(self, column: str, chance: float = float("nan")) -> Optional[float]:
        """The tolerance of a per-image score column (``chance``: the group's ACC chance), None for a column
        the rule does not test."""
        if column == "acc_hit":
            return self.acc_tolerance * chance
        if column in self.tolerances:
            return float(self.tolerances[column])
        for prefix, tol in self.tolerances.items():
            if prefix.endswith("_") and column.startswith(prefix):
                return float(tol)
        return None

    def describe(self) -> str:
        tol = ", ".join([f"ACC {self.acc_tolerance:g} x chance (top-{self.top_k} / N)"] +
                        [f"{'twoway_*' if k == 'twoway_' else k} {v:g}" for k, v in self.tolerances.items()])
        return (f"'{COLLAPSED}': the judge's IS over the group's generations (one split: exp(mean KL(p_i || mean p))) "
                f"< {self.max_is:g}, or the judge's top-1 puts >= {self.max_mode_share:g} of them in one class, or "
                f"the spread of their judge features (root mean per-dimension variance) < {self.min_spread:g} x the "
                f"spread of the same trials' ground truths; '{EQUALS_CONTROL}': for every score among ACC, PixCorr "
                f"and two-way identification, the paired permutation test against the '{self.control}' control "
                f"(per-trial means, {self.n_perm} sign flips or exact, seed {self.seed}) gives p > {self.p_value:g} "
                f"and |mean difference| <= its tolerance ({tol})")

    def as_dict(self) -> dict:
        return asdict(self)


def whole_set_is(probs: np.ndarray) -> float:
    """``exp(mean_i KL(p_i || mean_j p_j))`` of an (N, C) array of class distributions (1 = all the same)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None)
    p = p / p.sum(axis=1, keepdims=True)
    marginal = p.mean(axis=0, keepdims=True)
    return float(np.exp((p * (np.log(p) - np.log(marginal))).sum(axis=1).mean()))


def mode_share(probs: np.ndarray) -> float:
    """The fraction of rows whose top-1 class is the most frequent top-1."""
    top = np.asarray(probs, dtype=np.float64).argmax(axis=1)
    return float(np.bincount(top).max() / len(top))


def feature_spread(feats: np.ndarray) -> float:
    """Root mean per-dimension variance of an (N, D) array (0 = all rows equal)."""
    x = np.asarray(feats, dtype=np.float64)
    return float(np.sqrt(x.var(axis=0).mean())) if len(x) else float("nan")


def _collapse(sub: pd.DataFrame, rules: FlagRules) -> dict:
    ev: dict = {}
    if "probs" in sub.columns and sub["probs"].notna().all() and len(sub):
        probs = np.stack(sub["probs"].to_numpy())
        ev["is_whole"] = whole_set_is(probs)
        ev["mode_share"] = mode_share(probs)
    if {"fid_feats", "fid_gt"} <= set(sub.columns) and sub["fid_feats"].notna().all() and sub["fid_gt"].notna().all():
        gen = feature_spread(np.stack(sub["fid_feats"].to_numpy()))
        first = sub.drop_duplicates(["subject", "item"])
        ref = feature_spread(np.stack(first["fid_gt"].to_numpy())) if len(first) >= 2 else float("nan")
        ev["spread_ratio"] = gen / ref if np.isfinite(ref) and ref > 0 else float("nan")
    fired = (ev.get("is_whole", np.inf) < rules.max_is or ev.get("mode_share", 0.0) >= rules.max_mode_share
             or ev.get("spread_ratio", np.inf) < rules.min_spread)
    return {"fired": bool(fired), **ev}


def variant_flags(df: pd.DataFrame, rules: Optional[FlagRules] = None) -> pd.DataFrame:
    """One row per (subject, variant) group of ``df`` and per variant pooled (``subject == 'all'``), in
    :func:`~neuroimagen.metrics.summary.summarize`'s order: ``subject``, ``variant``, ``flags`` (``'; '``-joined
    names of the flags that fired, ``''`` when none) and ``evidence`` (a dict: the collapse measures, and per
    score the difference to the control and its p-value). See the module docstring for the rule."""
    rules = rules or FlagRules()
    df = df.copy()
    df["subject"] = df["subject"].astype(str)
    variants = list(dict.fromkeys(df["variant"]))
    subjects = sorted(set(df["subject"]), key=lambda s: (len(s), s))
    scores = [c for c in df.columns if rules.tolerance(c) is not None and not c.endswith("_chance")
              and pd.api.types.is_numeric_dtype(df[c])]
    tests = pd.DataFrame()
    if rules.control in variants and scores:
        pairs = [(v, rules.control) for v in variants if v != rules.control]
        tests = compare_variants(df, pairs, Statistics(n_perm=rules.n_perm, seed=rules.seed), metrics=scores)
    rows = []
    for v in variants:
        for s in subjects + ["all"]:
            sub = df[df["variant"] == v] if s == "all" else df[(df["variant"] == v) & (df["subject"] == s)]
            if not len(sub):
                continue
            collapse = _collapse(sub, rules)
            fired = [COLLAPSED] if collapse.pop("fired") else []
            ev = {k: round(float(x), 6) for k, x in collapse.items()}
            t = tests[(tests["subject"] == s) & (tests["a"] == v)] if len(tests) else tests
            if len(t):
                vs = {}
                chance = rules.top_k / float(sub["acc_n"].iloc[0]) if "acc_n" in sub.columns else float("nan")
                for r in t.itertuples():
                    tol = rules.tolerance("acc_hit" if r.metric == "acc" else r.metric, chance)
                    vs[r.metric] = {"diff": round(float(r.diff), 6), "p_value": round(float(r.p_value), 6),
                                    "tolerance": round(tol, 6),
                                    "equal": bool(r.p_value > rules.p_value and abs(r.diff) <= tol)}
                ev["vs_control"] = vs
                if all(x["equal"] for x in vs.values()):
                    fired.append(EQUALS_CONTROL)
            rows.append({"subject": s, "variant": v, "flags": "; ".join(fired), "evidence": ev})
    return pd.DataFrame(rows, columns=["subject", "variant", "flags", "evidence"])


def flag_warning(flags: pd.DataFrame) -> str:
    """One line naming every flagged variant and its flags (pooled and per subject), or ``''``."""
    hit = flags[flags["flags"] != ""]
    if not len(hit):
        return ""
    parts = []
    for v in dict.fromkeys(hit["variant"]):
        rows = hit[hit["variant"] == v]
        by_flag: dict[str, list[str]] = {}
        for r in rows.itertuples():
            for f in r.flags.split("; "):
                by_flag.setdefault(f, []).append("pooled" if r.subject == "all" else f"subject {r.subject}")
        parts.append(f"{v} " + ", ".join(f"{f} ({'; '.join(w)})" for f, w in by_flag.items()))
    return ("evaluate: WARNING: flagged variants: " + " | ".join(parts) +
            " (results/protocol.json 'flags' has the rule and the evidence)")
