"""One benchmark measurement in a fresh interpreter: ``python bench/probe.py KIND ARGS.json OUT.json``.

Kinds: ``setup`` (prepare a run: twin, trained stages, LDM, judge), ``train`` (train stages with one
backend, timing every epoch and report), ``ddp`` (saliency fits with several worker counts in one Ray
instance), ``data`` (reconstruction + scoring throughput with one backend / actor count), ``scale``
(``reconstruct()`` for growing subject x variant sets), ``scoring`` (Score with the field's suite vs the
three metrics alone, on the same generated images), ``flops`` (achieved FLOP/s of a GAN step vs a
matmul peak) and ``gpu`` (GPU performance options vs fp32). Every kind writes one JSON document.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path


def _cfg(overrides: list[str]):
    from neuroimagen.config import load_config

    return load_config(None, overrides)


def _log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# setup


def setup(a: dict) -> dict:
    """Synthesise the twin into ``run_dir`` and optionally train stages (local backend), the LDM and the judge."""
    from neuroimagen.runs.training import prepare_data, train

    run_dir = Path(a["run_dir"])
    cfg = _cfg(a["overrides"] + ["train.backend=local", "train.progress=false"])
    run_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    prepare_data(cfg, run_dir, _log)
    out = {"synth_s": time.perf_counter() - t}
    if a.get("stages"):
        t = time.perf_counter()
        train(cfg, run_dir, stages=a["stages"], log=_log)
        out["train_s"] = time.perf_counter() - t
    if a.get("eval_models"):
        from neuroimagen.data.datasets import load_splits
        from neuroimagen.runs.evaluation import prepare_classifier, prepare_ldm
        from neuroimagen.runs.training import prepare_data as prep

        cfg = prep(cfg, run_dir, _log)
        splits = load_splits(cfg.data, image_mode="path")
        t = time.perf_counter()
        snapshot, _ = prepare_ldm(cfg, run_dir, splits, _log)
        clf_spec, _ = prepare_classifier(cfg, run_dir, splits, min(cfg.ldm.resolution, 64), _log)
        out.update(eval_models_s=time.perf_counter() - t, snapshot=snapshot, classifier=clf_spec)
    (run_dir / "prepared.json").write_text(json.dumps({**a, **out}, indent=1))
    return out


# ---------------------------------------------------------------------------------------------------------------
# train: one backend, several stages, every epoch and every report timed


def _report_times(path: str):
    """A Ray Train callback (runs in the controller) appending the wall-clock time of every registered report
    to ``path``; defined here so that it is pickled by value (bench/ is not on the workers' path)."""
    import ray.train

    class ReportTimes(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):  # noqa: ARG002 - Ray's signature
            with open(path, "a") as f:
                f.write(f"{time.time()}\n")

    return ReportTimes()


def _instrument(times_dir: Path) -> dict:
    """Observe (never change) the product's training path: report times and each stage's fit() wall time."""
    import neuroimagen.distributed.train as dtrain
    import neuroimagen.training.loop as loop
    import neuroimagen.runs.training as run

    seen: dict = {}
    current = {"stage": None}
    orig_report = loop.LocalReporter.report

    def report(self, metrics, payload):
        orig_report(self, metrics, payload)
        seen.setdefault(current["stage"], {}).setdefault("reports", []).append(time.time())

    loop.LocalReporter.report = report
    orig_trainer_for = dtrain.trainer_for

    def trainer_for(name, cfg, inputs, run_dir, run_name=None, callbacks=None):
        path = times_dir / f"{name}-reports.txt"
        seen.setdefault(name, {})["reports_file"] = str(path)
        return orig_trainer_for(name, cfg, inputs, run_dir, run_name=run_name,
                                callbacks=list(callbacks or []) + [_report_times(str(path))])

    dtrain.trainer_for = trainer_for

    def timed(fn):
        def wrapper(name, *args, **kw):
            current["stage"] = name
            t0 = time.time()
            try:
                return fn(name, *args, **kw)
            finally:
                seen.setdefault(name, {}).update(fit_start=t0, fit_end=time.time())
        return wrapper

    run.fit_local = timed(run.fit_local)
    dtrain.fit_on_ray = timed(dtrain.fit_on_ray)
    return seen


def _stage_breakdown(info: dict, history: list[dict]) -> dict:
    """Split a stage's fit() wall time into start-up, epochs, per-epoch reporting and teardown."""
    ep = [float(h["epoch_seconds"]) for h in history]
    reports = info.get("reports")
    if reports is None and info.get("reports_file") and Path(info["reports_file"]).is_file():
        reports = [float(x) for x in Path(info["reports_file"]).read_text().split()]
    reports = reports or []
    wall = info["fit_end"] - info["fit_start"]
    out = {"epoch_s": ep, "fit_wall_s": wall, "fixed_s": wall - sum(ep)}
    if len(reports) == len(ep) and ep:
        intervals = [reports[i] - reports[i - 1] for i in range(1, len(reports))]
        out.update(interval_s=intervals,
                   startup_s=reports[0] - ep[0] - info["fit_start"],
                   teardown_s=info["fit_end"] - reports[-1],
                   report_overhead_s=[iv - e for iv, e in zip(intervals, ep[1:])])
    return out


def train_probe(a: dict) -> dict:
    """Train ``stages`` into ``run_dir`` (twin already there) with ``backend``; per-stage breakdowns."""
    from neuroimagen.backends import train

    run_dir = Path(a["run_dir"])
    cfg = _cfg(a["overrides"] + [f"train.backend={a['backend']}", "train.progress=false"])
    seen = _instrument(run_dir)
    out: dict = {"backend": a["backend"]}
    if a["backend"] == "ray":
        from neuroimagen.distributed.train import init_ray

        t = time.perf_counter()
        init_ray(cfg)
        out["ray_start_s"] = time.perf_counter() - t
    train(cfg, run_dir, stages=a["stages"], log=_log)
    out["stages"] = {}
    for name in a["stages"]:
        hist = json.loads((run_dir / name / "history.json").read_text())
        out["stages"][name] = _stage_breakdown(seen[name], hist)
    return out


# ---------------------------------------------------------------------------------------------------------------
# ddp: saliency with W workers x batch b, one Ray instance, configurations interleaved


def ddp_probe(a: dict) -> dict:
    from neuroimagen.distributed.train import fit_on_ray, init_ray
    from neuroimagen.runs.training import prepare_data, read_run, stage_inputs

    base = Path(a["run_dir"])
    cfg0 = _cfg(a["overrides"] + ["train.backend=ray", "train.progress=false"])
    t = time.perf_counter()
    init_ray(cfg0)
    out = {"ray_start_s": time.perf_counter() - t, "fits": []}
    cfg0 = prepare_data(cfg0, base, _log)
    record = read_run(base)
    inputs = stage_inputs("saliency", cfg0, base, record)
    from neuroimagen.config import override

    for i, (workers, batch) in enumerate(a["configs"]):
        storage = Path(a["scratch"]) / f"fit-{i}-{workers}x{batch}"
        cfg = override(cfg0, [f"train.num_workers={workers}", f"stages.saliency.batch_size={batch}",
                              f"train.storage_path={storage}"])
        t = time.perf_counter()
        payload = fit_on_ray("saliency", cfg, inputs, base, _log)
        wall = time.perf_counter() - t
        hist = payload["meta"]["history"]
        n_train = payload["meta"]["data"]["train"]["n"]
        out["fits"].append({"workers": workers, "batch_per_worker": batch, "fit_wall_s": wall, "n_train": n_train,
                            "epoch_s": [float(h["epoch_seconds"]) for h in hist]})
        shutil.rmtree(storage, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------------------------
# data: reconstruction + scoring throughput (run_local / run_on_ray, the two paths of reconstruct())


def _eval_parts(run_dir: Path, cfg, variants, subjects, threads: int = 0):
    from neuroimagen.data.datasets import load_recording
    from neuroimagen.reconstruction.factory import RunSources, stage_models
    from neuroimagen.reconstruction.rows import build_rows, needed_stages
    from neuroimagen.runs.training import read_run

    prep = json.loads((run_dir / "prepared.json").read_text())
    rec = load_recording(cfg.data, check_images=False)
    rows = build_rows(cfg, rec, variants, subjects)
    sources = RunSources(run_dir=str(run_dir), snapshot=prep["snapshot"], classifier=prep["classifier"],
                         models=stage_models(run_dir, read_run(run_dir), needed_stages(cfg, variants)), threads=threads)
    return rows, sources


def data_probe(a: dict) -> dict:
    """Push the first ``n`` rows through the local loop or the Ray Data pipeline, for each ``n`` in ``sizes`` (a
    new pipeline each time: actor start and model load are paid per run, so they cancel in the difference)."""
    from neuroimagen.runs.training import prepare_data

    run_dir = Path(a["run_dir"])
    cfg = _cfg(a["overrides"] + ["train.progress=false", f"eval.actors={a.get('actors', 1)}",
                                 f"eval.pipeline={a.get('pipeline', 'fused')}"])
    cfg = prepare_data(cfg, run_dir, _log)
    rows, sources = _eval_parts(run_dir, cfg, a["variants"], a.get("subjects"), threads=a["threads"])
    out: dict = {"backend": a["backend"], "actors": a.get("actors", 1), "threads": a["threads"], "rows": len(rows),
                 "batch_size": cfg.eval.batch_size, "runs": []}
    if a["backend"] == "local":
        from neuroimagen.runs.evaluation import run_local
        from neuroimagen.reconstruction.factory import load_decode, load_generate, load_score

        loads = {}
        for name, load in (("decode", load_decode), ("generate", load_generate), ("score", load_score)):
            t = time.perf_counter()
            load(cfg, sources)
            loads[name] = time.perf_counter() - t
        out["model_load_s"] = loads

        def run(rs, on_batch):
            run_local(rs, cfg, sources, on_batch, progress=False)
    else:
        from neuroimagen.distributed.data import run_on_ray
        from neuroimagen.distributed.train import init_ray

        t = time.perf_counter()
        init_ray(cfg)
        out["ray_start_s"] = time.perf_counter() - t

        def run(rs, on_batch):
            run_on_ray(rs, cfg, sources, on_batch, progress=False)
    for n in a["sizes"]:
        arrivals: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        run(rows[:n], lambda batch: arrivals.append((time.perf_counter() - t0, len(batch["item"]))))
        out["runs"].append({"rows": min(n, len(rows)), "wall_s": time.perf_counter() - t0, "arrivals": arrivals,
                            "scored": sum(k for _, k in arrivals)})
    return out


# ---------------------------------------------------------------------------------------------------------------
# scale: reconstruct() (the product function) over growing subject x variant sets


def scale_probe(a: dict) -> dict:
    from neuroimagen.backends import reconstruct
    from neuroimagen.runs.training import prepare_data

    run_dir = Path(a["run_dir"])
    cfg = _cfg(a["overrides"] + ["train.progress=false", f"eval.backend={a['backend']}"])
    cfg = prepare_data(cfg, run_dir, _log)
    out: dict = {"backend": a["backend"], "sizes": []}
    if a["backend"] == "ray":
        from neuroimagen.distributed.train import init_ray

        t = time.perf_counter()
        init_ray(cfg)
        out["ray_start_s"] = time.perf_counter() - t
    if a.get("warmup"):  # once-per-process costs (imports, first Ray Data run) are not a per-call cost
        small = min(a["sizes"], key=lambda s: len(s["variants"]) * len(s["subjects"]))
        shutil.rmtree(run_dir / "results", ignore_errors=True)
        t = time.perf_counter()
        reconstruct(cfg, run_dir, variants=small["variants"], subjects=small["subjects"], log=_log)
        out["warmup_s"] = time.perf_counter() - t
    for size in a["sizes"]:
        shutil.rmtree(run_dir / "results", ignore_errors=True)  # no finished shard may be reused
        t = time.perf_counter()
        info = reconstruct(cfg, run_dir, variants=size["variants"], subjects=size["subjects"], log=_log)
        out["sizes"].append({**size, "rows": info["rows"], "computed": info["computed"], "wall_s": time.perf_counter() - t})
    return out


# ---------------------------------------------------------------------------------------------------------------
# flops: counted FLOPs of one GAN training step / its median time, against an fp32 matmul peak


def _saliency_stage(cfg, ctx):
    import torch

    from neuroimagen.data.datasets import load_splits
    from neuroimagen.stages import build_stage
    from neuroimagen.stages.encoder import build_from_spec, encoder_spec

    splits = load_splits(cfg.data, image_mode="path")
    C, T = splits["train"].eeg_tensor().shape[1:]
    spec = encoder_spec(cfg.stages.encoder, C, T)
    torch.manual_seed(0)
    enc = build_from_spec(spec)  # untrained: the step's cost does not depend on the weights
    return build_stage("saliency", cfg, ctx, {"splits": splits, "encoder_spec": spec, "encoder_state": enc.state_dict()})


def _step_times(stage, n: int, warmup: int, sync=None) -> list[float]:
    batches = []
    while len(batches) < n + warmup:
        batches.extend(stage.loader)
    out = []
    for i, b in enumerate(batches[: n + warmup]):
        t = time.perf_counter()
        stage.train_step(b)
        if sync:
            sync()
        if i >= warmup:
            out.append(time.perf_counter() - t)
    return out


def matmul_peak(n: int, repeats: int, device: str = "cpu") -> dict:
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync()
        ts.append(time.perf_counter() - t)
    med = statistics.median(ts)
    return {"n": n, "seconds": ts, "flops_per_s": 2 * n**3 / med}


def flops_probe(a: dict) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from neuroimagen.training.context import RunContext
    from neuroimagen.runs.training import prepare_data

    if a.get("threads"):
        torch.set_num_threads(int(a["threads"]))
    base = Path(a["run_dir"])
    out: dict = {"threads": torch.get_num_threads(), "cases": {}}
    out["peak_before"] = matmul_peak(a["matmul_n"], a["matmul_repeats"])
    for case, overrides in a["cases"].items():
        cfg = prepare_data(_cfg(overrides + ["train.backend=local", "train.progress=false"]), base, _log)
        stage = _saliency_stage(cfg, RunContext())
        stage.set_epoch(0)
        batch = next(iter(stage.loader))
        with FlopCounterMode(display=False) as fc:
            stage.train_step(batch)
        flops = fc.get_total_flops()
        times = _step_times(stage, a["steps"][case], warmup=1)
        sc = cfg.stages.saliency
        out["cases"][case] = {"flops_per_step": flops, "step_s": times, "batch": int(batch["image"].shape[0]),
                              "resolution": sc.resolution, "g_width": sc.g_width, "d_width": sc.d_width,
                              "z_dim": sc.z_dim, "flops_per_s": flops / statistics.median(times)}
    out["peak_after"] = matmul_peak(a["matmul_n"], a["matmul_repeats"])
    return out


# ---------------------------------------------------------------------------------------------------------------
# gpu: performance options vs the fp32 default, on a CUDA device (never reached without one)


def gpu_probe(a: dict) -> dict:
    import torch

    from neuroimagen.config import override
    from neuroimagen.training.context import RunContext, perf_options
    from neuroimagen.runs.training import prepare_data

    base = Path(a["run_dir"])
    cfg0 = prepare_data(_cfg(a["overrides"] + ["train.backend=local", "train.progress=false"]), base, _log)
    sync = torch.cuda.synchronize
    out: dict = {"device": torch.cuda.get_device_name(0), "gan": {}, "ldm": {}}
    for name, sets in a["gan_options"].items():
        try:
            cfg = override(cfg0, sets)
            stage = _saliency_stage(cfg, RunContext(device=torch.device("cuda"), **perf_options(cfg.train)))
            stage.set_epoch(0)
            warm = a["warmup_compile"] if "train.compile=true" in sets else a["warmup"]
            out["gan"][name] = {"step_s": _step_times(stage, a["steps"], warmup=warm, sync=sync)}
        except Exception as exc:  # noqa: BLE001 - a missing option is a result, not a crash
            out["gan"][name] = {"error": f"{exc.__class__.__name__}: {exc}"[:300]}
    if a.get("ldm_run_dir"):
        import dataclasses

        from neuroimagen.reconstruction.factory import load_decode, load_generate
        from neuroimagen.reconstruction.rows import rows_to_batch

        run_dir = Path(a["ldm_run_dir"])
        cfg_d = prepare_data(_cfg(a["ldm_overrides"] + ["train.progress=false"]), run_dir, _log)
        rows, sources = _eval_parts(run_dir, cfg_d, a["ldm_variants"], None)
        batch = load_decode(cfg_d, sources)(rows_to_batch(rows[: cfg_d.eval.batch_size]))
        for name, attention in (("sdpa", "sdpa"), ("eager", "eager")):
            try:
                gen = load_generate(override(cfg_d, [f"ldm.attention={attention}"]),
                                    dataclasses.replace(sources, device="cuda"))
                gen(batch)
                sync()
                ts = []
                for _ in range(a["steps"]):
                    t = time.perf_counter()
                    gen(batch)
                    sync()
                    ts.append(time.perf_counter() - t)
                out["ldm"][name] = {"batch_s": ts}
            except Exception as exc:  # noqa: BLE001
                out["ldm"][name] = {"error": f"{exc.__class__.__name__}: {exc}"[:300]}
    return out


# ---------------------------------------------------------------------------------------------------------------
# scoring: the per-image cost of Score with the field's suite against Score with ACC, IS and SSIM only


def scoring_probe(a: dict) -> dict:
    """Generate the rows' images once, then time two scorers on the same batches, interleaved: ``plain`` (ACC
    hits, the IS probabilities, SSIM: the three metrics scored before the suite) and ``suite`` (the same plus
    the embedded suite: PixCorr, the chance baselines, two-way identification and FID/KID features on the
    judge's pooled features, against per-subject galleries)."""
    import dataclasses

    import torch

    from neuroimagen.reconstruction.factory import load_decode, load_generate, load_score
    from neuroimagen.reconstruction.rows import rows_to_batch
    from neuroimagen.runs.evaluation import galleries
    from neuroimagen.runs.training import prepare_data

    run_dir = Path(a["run_dir"])
    cfg = prepare_data(_cfg(a["overrides"] + ["train.progress=false"]), run_dir, _log)
    rows, sources = _eval_parts(run_dir, cfg, a["variants"], a.get("subjects"), threads=a["threads"])
    torch.set_num_threads(int(a["threads"]))
    decode, generate = load_decode(cfg, sources), load_generate(cfg, sources)
    bs = cfg.eval.batch_size
    batches = [generate(decode(rows_to_batch(rows[i:i + bs]))) for i in range(0, len(rows), bs)]
    scorers = {"plain": load_score(cfg, dataclasses.replace(sources, write_images=False)),
               "suite": load_score(cfg, dataclasses.replace(sources, write_images=False, gallery=galleries(rows)))}
    for score in scorers.values():  # warm-up: caches of ground truths and galleries, first-call costs
        for b in batches:
            score(b)
    import importlib

    import torch.nn.functional as F

    ssim_module = importlib.import_module("neuroimagen.metrics.ssim")  # the module (the package exports a function)

    shifted = ssim_module._filter_valid

    def grouped_conv(x, taps):  # the SSIM filter before the shifted-views one: a float64 grouped conv2d
        c, win = x.shape[1], taps.numel()
        kh, kw = taps.view(1, 1, win, 1).expand(c, 1, win, 1), taps.view(1, 1, 1, win).expand(c, 1, 1, win)
        return F.conv2d(F.conv2d(x, kh, groups=c), kw, groups=c)

    names = list(scorers) + ["plain-conv"]  # plain-conv: the plain scorer with the old SSIM filter
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(a["repeats"]):
        for name in (names if r % 2 == 0 else names[::-1]):
            ssim_module._filter_valid = grouped_conv if name == "plain-conv" else shifted
            score = scorers["plain" if name == "plain-conv" else name]
            t = time.perf_counter()
            for b in batches:
                score(b)
            times[name].append(time.perf_counter() - t)
    ssim_module._filter_valid = shifted
    cols = sorted(set(scorers["suite"](batches[0])) - set(scorers["plain"](batches[0])))
    return {"images": len(rows), "batch_size": bs, "threads": a["threads"], "times_s": times, "suite_columns": cols}


KINDS = {"setup": setup, "train": train_probe, "ddp": ddp_probe, "data": data_probe, "scale": scale_probe, "scoring": scoring_probe,
         "flops": flops_probe, "gpu": gpu_probe}

if __name__ == "__main__":
    kind, spec, dest = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    result = KINDS[kind](json.loads(spec.read_text()))
    dest.write_text(json.dumps(result, default=str), encoding="utf-8")
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - the result is already written
        pass
