"""Search spaces for ``neuroimagen tune``: a YAML file, validated strictly before anything starts.

A space file names everything a sweep needs::

    base: ../configs/quick.yaml        # config the trials start from (relative to this file)
    stage: saliency                    # the stage swept; the stages it needs are trained once, shared
    metric: val_ssim                   # a validation metric of that stage (never a test number)
    mode: max
    params:                            # dotted config keys -> one distribution each
      stages.saliency.alpha1: {loguniform: [1.0e-3, 1.0]}
      stages.saliency.alpha3: {uniform: [0.2, 2.0]}
      stages.saliency.diffaugment: {choice: ["color,translation", "color,translation,cutout"]}
    scheduler: {type: asha, grace_period: 4, reduction_factor: 2}   # or {type: fifo}; max_t = the stage's epochs
    search: {type: random, seed: 0}    # random | optuna | hyperopt (the last two if installed)
    num_samples: 8
    max_concurrent_trials: 2
    resources_per_trial: {cpu: 1, gpu: 0}   # per Train worker inside the trial
    trainer: ray                       # ray: each trial fits its own TorchTrainer; local: fit() in the trial
    set: ["stages.saliency.epochs=12"] # extra overrides of the base config

Distributions: ``uniform [lo, hi]``, ``loguniform [lo, hi]`` (lo > 0), ``quniform [lo, hi, q]``,
``randint [lo, hi)``, ``choice [values]``, ``grid [values]`` (every value, times num_samples). Every key
must exist in the config and every value a distribution can produce must be valid for it: both are
checked here, with the config loader's own validation, before Ray is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from matplotlib.figure import Figure

from neuroimagen.atomic import atomic_path
from neuroimagen.config import Config, ConfigError, from_dict, load_config, override, read_yaml_mapping, to_dict

DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice", "grid")
STAGE_METRICS = {
    "encoder": {"val_knn_acc": "max", "val_kmeans_acc": "max"},
    "saliency": {"val_condition_gain": "max", "val_ssim": "max", "val_pixcorr": "max", "val_objective": "max", "val_diversity": "max",
                 "val_kid": "min"},
    "semantic": {"val_std_mse": "min", "val_mse": "min", "val_cosine": "max", "val_nearest_class_acc": "max"},
    "semantic_image": {"val_std_mse": "min", "val_mse": "min", "val_cosine": "max", "val_nearest_class_acc": "max"},
    "clip_image": {"val_top1": "max", "val_top5": "max"},
}
_TOP_KEYS = ("base", "stage", "metric", "mode", "params", "scheduler", "search", "num_samples",
             "max_concurrent_trials", "resources_per_trial", "trainer", "set")


@dataclasses.dataclass(frozen=True)
class Space:
    path: str
    base: Optional[str]
    stage: str
    metric: str
    mode: str
    params: dict  # dotted key -> (distribution, args)
    scheduler: dict
    search: dict
    num_samples: int
    max_concurrent_trials: int
    cpu: float
    gpu: float
    trainer: str
    sets: tuple

    def base_config(self, extra_sets: Sequence[str] = (), config_path: Optional[str] = None) -> Config:
        cfg = load_config(config_path or self.base, list(self.sets))
        return override(cfg, list(extra_sets)) if extra_sets else cfg

    def describe(self) -> dict:
        return {"space": self.path, "stage": self.stage, "metric": self.metric, "mode": self.mode,
                "params": {k: {d: list(a) if isinstance(a, tuple) else a} for k, (d, a) in self.params.items()},
                "scheduler": self.scheduler, "search": self.search, "num_samples": self.num_samples,
                "max_concurrent_trials": self.max_concurrent_trials, "trainer": self.trainer}


def _fail(path: str, key: str, what: str) -> ConfigError:
    return ConfigError(f"{path}: {key}: {what}")


def apply_values(cfg: Config, values: dict) -> Config:
    """``cfg`` with typed values set at dotted keys, validated like a config file."""
    raw = to_dict(cfg)
    for dotted, value in values.items():
        node = raw
        parts = dotted.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"{dotted}: unknown key")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"{dotted}: unknown key")
        node[parts[-1]] = list(value) if isinstance(value, tuple) else value
    return from_dict(type(cfg), raw)


def _number(path, key, v, what="a number"):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise _fail(path, key, f"expected {what}, got {v!r}")
    return v


def _parse_param(path: str, key: str, spec: Any) -> tuple[str, Any]:
    where = f"params.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise _fail(path, where, f"expected one distribution, e.g. {{uniform: [0.1, 1.0]}} (known: {', '.join(DISTRIBUTIONS)})")
    (dist, args), = spec.items()
    if dist not in DISTRIBUTIONS:
        raise _fail(path, where, f"unknown distribution '{dist}' (known: {', '.join(DISTRIBUTIONS)})")
    if dist in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise _fail(path, where, f"{dist}: expected a non-empty list of values")
        return dist, tuple(args)
    n = 3 if dist == "quniform" else 2
    if not isinstance(args, list) or len(args) != n:
        raise _fail(path, where, f"{dist}: expected [{'low, high, q' if n == 3 else 'low, high'}]")
    args = [_number(path, where, float(a) if isinstance(a, str) and _is_float(a) else a) for a in args]
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise _fail(path, where, f"{dist}: expected low < high, got [{lo}, {hi}]")
    if dist == "loguniform" and lo <= 0:
        raise _fail(path, where, f"loguniform: expected low > 0, got {lo}")
    if dist == "randint" and not all(float(a).is_integer() for a in args):
        raise _fail(path, where, f"randint: expected integer bounds, got {args}")
    if dist == "quniform" and args[2] <= 0:
        raise _fail(path, where, f"quniform: expected q > 0, got {args[2]}")
    return dist, tuple(args)


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _extremes(dist: str, args: tuple) -> list:
    """Values a distribution can produce that are worth validating against the config (bounds, choices)."""
    if dist in ("choice", "grid"):
        return list(args)
    if dist == "randint":
        return [int(args[0]), int(args[1]) - 1]
    if dist == "quniform":
        return [round(args[0] / args[2]) * args[2], round(args[1] / args[2]) * args[2]]
    return [args[0], args[1]]


def load_space(path: str | Path, config_path: Optional[str] = None, extra_sets: Sequence[str] = ()) -> tuple[Space, Config]:
    """Read and validate a space file; returns (space, base config). Every problem is one ConfigError."""
    p = Path(path)
    raw = read_yaml_mapping(p, what="search space")
    src = str(p)
    for k in raw:
        if k not in _TOP_KEYS:
            close = difflib.get_close_matches(str(k), _TOP_KEYS, n=1)
            raise _fail(src, str(k), "unknown key" + (f" (did you mean '{close[0]}'?)" if close else
                                                      f" (known keys: {', '.join(_TOP_KEYS)})"))
    for k in ("stage", "metric", "params"):
        if k not in raw:
            raise _fail(src, k, "missing (a space file names the stage, the validation metric and the params)")
    stage = raw["stage"]
    if stage not in STAGE_METRICS:
        raise _fail(src, "stage", f"unknown stage {stage!r} (known: {', '.join(STAGE_METRICS)})")
    metric = raw["metric"]
    if metric not in STAGE_METRICS[stage]:
        raise _fail(src, "metric", f"{metric!r} is not a validation metric of stage {stage} "
                                   f"(known: {', '.join(STAGE_METRICS[stage])}); sweeps select on validation data only")
    mode = raw.get("mode", STAGE_METRICS[stage][metric])
    if mode not in ("max", "min"):
        raise _fail(src, "mode", f"expected 'max' or 'min', got {mode!r}")
    base = raw.get("base")
    if base is not None:
        if not isinstance(base, str):
            raise _fail(src, "base", f"expected a config file path, got {base!r}")
        base = str((p.resolve().parent / base).resolve()) if not Path(base).is_absolute() else base
    if not isinstance(raw["params"], dict) or not raw["params"]:
        raise _fail(src, "params", "expected a mapping of dotted config keys to distributions")
    params = {str(k): _parse_param(src, str(k), v) for k, v in raw["params"].items()}
    sched = raw.get("scheduler") or {"type": "asha"}
    if not isinstance(sched, dict) or sched.get("type", "asha") not in ("asha", "fifo"):
        raise _fail(src, "scheduler", f"expected {{type: asha|fifo, ...}}, got {sched!r}")
    unknown = set(sched) - {"type", "grace_period", "reduction_factor", "max_epochs"}
    if unknown:
        raise _fail(src, "scheduler", f"unknown key '{sorted(unknown)[0]}' (known: type, grace_period, reduction_factor, max_epochs)")
    sched = {"type": sched.get("type", "asha"), "grace_period": int(sched.get("grace_period", 2)),
             "reduction_factor": float(sched.get("reduction_factor", 2)), "max_epochs": sched.get("max_epochs")}
    search = raw.get("search") or {"type": "random"}
    if not isinstance(search, dict) or search.get("type", "random") not in ("random", "optuna", "hyperopt"):
        raise _fail(src, "search", f"expected {{type: random|optuna|hyperopt, seed: N}}, got {search!r}")
    search = {"type": search.get("type", "random"), "seed": int(search.get("seed", 0))}
    if search["type"] != "random":
        mod = {"optuna": "optuna", "hyperopt": "hyperopt"}[search["type"]]
        if importlib.util.find_spec(mod) is None:
            raise _fail(src, "search.type", f"'{search['type']}' needs the {mod} package, which is not installed "
                                            f"(pip install {mod}, or use type: random)")
        if any(d == "grid" for d, _ in params.values()):
            raise _fail(src, "params", f"grid is only supported with search type random, not {search['type']}")
    res = raw.get("resources_per_trial") or {}
    if not isinstance(res, dict) or set(res) - {"cpu", "gpu"}:
        raise _fail(src, "resources_per_trial", f"expected {{cpu: N, gpu: N}}, got {res!r}")
    ints = {}
    for k, default in (("num_samples", 8), ("max_concurrent_trials", 2)):
        v = raw.get(k, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise _fail(src, k, f"expected an integer >= 1, got {v!r}")
        ints[k] = v
    trainer = raw.get("trainer", "ray")
    if trainer not in ("ray", "local"):
        raise _fail(src, "trainer", f"expected 'ray' or 'local', got {trainer!r}")
    sets = raw.get("set") or []
    if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
        raise _fail(src, "set", "expected a list of 'key=value' strings")
    space = Space(path=src, base=base, stage=stage, metric=metric, mode=mode, params=params, scheduler=sched,
                  search=search, num_samples=ints["num_samples"], max_concurrent_trials=ints["max_concurrent_trials"],
                  cpu=float(res.get("cpu", 1)), gpu=float(res.get("gpu", 0)), trainer=trainer, sets=tuple(sets))
    try:
        cfg = space.base_config(extra_sets, config_path)
    except ConfigError as exc:
        raise ConfigError(f"{src}: base config: {exc}") from None
    for key, (dist, args) in params.items():  # every key exists, every extreme value is valid for it
        for v in _extremes(dist, args):
            try:
                apply_values(cfg, {key: v})
            except ConfigError as exc:
                raise _fail(src, f"params.{key}", f"{dist} value {v!r} is not valid for the config ({exc})") from None
    return space, cfg


def best_row(results, metric: str, mode: str):
    """The best finished trial of a results table (pandas), by its best validation value."""
    col = f"best_{metric}"
    ok = results[results[col].notna()]
    if ok.empty:
        raise ConfigError(f"no trial reported {metric}")
    return ok.loc[ok[col].idxmax() if mode == "max" else ok[col].idxmin()]


def plot_trials(histories: dict, metric: str, path: Path, title: str) -> Path:
    """Metric per trial over epochs (one line per trial; short lines are trials the scheduler stopped)."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for tid, pts in sorted(histories.items()):
        if pts:
            ax.plot([e + 1 for e, _ in pts], [v for _, v in pts], marker="o", ms=2, lw=1, label=tid)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    if len(histories) <= 16:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return path
