"""Reconstruction + scoring benchmarks: Ray Data vs the local loop, actor scaling, growth with rows, the cost of
the field's suite in the scoring pass."""

from __future__ import annotations

from bench_common import median, prepared, probe
from bench_train import demo_preset


def _s(x, fmt: str = ".1f") -> str:
    return "—" if x is None else format(x, fmt)


def _eval_preset(quick: bool) -> list[str]:
    # A small trained run with the demo's model sizes. Training lengths only change quality, never the cost of
    # reconstruction or scoring, so they are cut short (2 epochs per stage, short LDM/judge schedules).
    return demo_preset() + ["stages.encoder.epochs=2", "stages.saliency.epochs=2", "stages.semantic.epochs=2",
                            "ldm.vae_steps=30", "ldm.unet_steps=60", "eval.judge_steps=30",
                            "eval.batch_size=16", f"eval.max_trials={3 if quick else 5}"]


def _prepared_eval(quick: bool):
    pre = _eval_preset(quick)
    # The cache key leaves out eval.max_trials (it changes only which rows are listed).
    key = [s for s in pre if not s.startswith("eval.max_trials=")]
    base = prepared("eval", {"overrides": key, "stages": ["encoder", "saliency", "semantic", "semantic_image"],
                             "eval_models": True})
    return base, pre


def throughput(doc: dict) -> dict:
    """Steady-state images/s from two pipeline runs of n1 < n2 rows: (n2 - n1) / (t2 - t1), so actor start,
    model load and the pipeline's fill and drain cancel; start-up = t1 - n1 / rate. (Ray Data may hand scored
    batches to the driver in bursts, so the time between batch arrivals is no measure of throughput.)"""
    (r1, r2) = sorted(doc["runs"], key=lambda r: r["rows"])
    dt = r2["wall_s"] - r1["wall_s"]
    rate = (r2["rows"] - r1["rows"]) / dt if dt > 0 else None
    return {"images_per_s": rate, "startup_s": r1["wall_s"] - r1["rows"] / rate if rate else None,
            "first_batch_s": r2["arrivals"][0][0] if r2["arrivals"] else None,
            "rows": [r1["rows"], r2["rows"]], "wall_s": [r1["wall_s"], r2["wall_s"]],
            "overall_images_per_s": r2["rows"] / r2["wall_s"]}


def bench_data(repeats: int, quick: bool = False) -> dict:
    """Images/s of reconstruct + score: Ray Data (1 actor) vs the local loop; 2 actors vs 1 actor, 1 thread each."""
    repeats = 1 if quick else repeats
    base, pre = _prepared_eval(quick)
    variants = ["I", "L", "B", "B+I", "L+I", "oracle", "other-class"]
    # (label, backend, generation actors, torch threads of each generation process, Ray Data layout)
    cases = [("local", "local", 1, 2, "fused"), ("ray-1x1", "ray", 1, 1, "fused"), ("ray-2x1", "ray", 2, 1, "fused"),
             ("ray-1x2", "ray", 1, 2, "fused"), ("ray-1x1-staged", "ray", 1, 1, "staged")]
    docs: dict[str, list[dict]] = {c[0]: [] for c in cases}
    small = 2 * 16  # two batches; the large run takes every row (7 variants x max_trials x 3 samples)
    sizes = [small, 10**6]
    for r in range(repeats):
        order = cases if r % 2 == 0 else cases[::-1]  # interleaved
        for label, backend, actors, threads, layout in order:
            docs[label].append(probe("data", {"run_dir": str(base), "overrides": pre, "backend": backend, "actors": actors,
                                              "threads": threads, "pipeline": layout, "variants": variants, "subjects": [1],
                                              "sizes": sizes if r % 2 == 0 else sizes[::-1]}))
    tp = {k: [throughput(d) for d in v] for k, v in docs.items()}

    def med(k, key):
        return median([t[key] for t in tp[k]])

    bd: dict = {"config": {"rows per run (small, large)": f"{small}, {docs['local'][0]['rows']}",
                           "batch size": docs["local"][0]["batch_size"],
                           "variants": ", ".join(variants), "subjects": "1", "runs per case": repeats,
                           "models": "demo --quick tiny LDM (10 DDIM steps) + judge CNN",
                           "steady state": "(large rows - small rows) / (large wall - small wall), a new pipeline per run"}}
    for label, backend, actors, threads, layout in cases:
        bd[f"{label} ({backend}, {layout}, {actors} generation actor(s) x {threads} thread(s))"] = {
            "steady images/s (median)": med(label, "images_per_s"),
            "overall images/s incl. start-up (median)": med(label, "overall_images_per_s"),
            "time to the first scored batch, large run (median), s": med(label, "first_batch_s"),
            "start-up = small wall minus small rows / rate (median), s": med(label, "startup_s"),
            "walls (small, large), s (all runs)": [round(x, 2) for t in tp[label] for x in t["wall_s"]],
            "rows (small, large)": tp[label][0]["rows"]}
    loads = [d["model_load_s"] for d in docs["local"]]
    bd["fixed costs"] = {"Ray start (init_ray), s": median([d["ray_start_s"] for k in docs if k != "local" for d in docs[k]]),
                         "model load, Decode (encoder, G, regressors, text encoder, recording), s": median([x["decode"] for x in loads]),
                         "model load, Generate (LDM pipeline), s": median([x["generate"] for x in loads]),
                         "model load, Score (judge), s": median([x["score"] for x in loads]),
                         "Ray Data actor start + model load (ray-1x1 start-up minus local start-up), s":
                             (med("ray-1x1", "startup_s") or 0) - (med("local", "startup_s") or 0)}
    loc, r11, r21, r12, r11s = (med(k, "images_per_s") for k in ("local", "ray-1x1", "ray-2x1", "ray-1x2", "ray-1x1-staged"))

    def div(a, b):
        return a / b if a and b else None

    ratio1, ratio2 = div(r11, loc), div(r21, r11)
    met1 = ratio1 is not None and ratio1 >= 0.9
    met2 = ratio2 is not None and ratio2 >= 1.7
    fixed = bd["fixed costs"]
    rows = [
        {"what": "Ray Data reconstruct + score, 1 actor x 1 thread (fused layout, one torch thread per actor CPU, as "
                 "reconstruct() sets it), steady state",
         "compared with": "the plain sequential loop over the same rows (eval.backend=local, 2 threads)",
         "ratio": ratio1, "target": ">= 0.9x images/s", "met": met1,
         "detail": (f"{_s(r11)} vs {_s(loc)} images/s; first scored batch (large run) after "
                    f"{_s(med('ray-1x1', 'first_batch_s'))} s vs {_s(med('local', 'first_batch_s'))} s"),
         **({} if met1 else {"why": "the loop runs one process with both cores' worth of torch threads; the actor "
                                    "reserves one CPU and runs one thread, while the second core serves the driver "
                                    "(Ray Data's streaming executor, the shard writer) and Ray's raylet/GCS. Giving the "
                                    "actor two threads is slower, not faster (the row below): its OpenMP team stalls "
                                    "whenever those processes take a core."})},
        {"what": "Ray Data, 2 actors x 1 thread, steady state",
         "compared with": "1 actor x 1 thread",
         "ratio": ratio2, "target": ">= 1.7x images/s", "met": met2,
         "detail": f"{_s(r21)} vs {_s(r11)} images/s ({_s(div(r21, loc))}x the local loop)",
         **({} if met2 else {"why": "a second actor can only add the part of the second core that the driver and "
                                    "Ray's own processes leave free; on 2 cores that is little, and two "
                                    "actors then contend for it."})},
        {"what": "hot-path fix: Ray Data actor with 1 torch thread (its CPU) instead of cores / actors = 2",
         "compared with": "the same actor with 2 threads (before)", "ratio": div(r11, r12),
         "target": "(before/after, images/s)", "met": (div(r11, r12) or 0) > 1,
         "detail": f"{_s(r11)} vs {_s(r12)} images/s"},
        {"what": "hot-path fix: fused layout (decode -> generate -> score in one actor)",
         "compared with": "the staged layout: three actor pools (before)", "ratio": div(r11, r11s),
         "target": "(before/after, images/s)", "met": (div(r11, r11s) or 0) > 1,
         "detail": f"{_s(r11)} vs {_s(r11s)} images/s, 1 generation actor x 1 thread each"},
        {"what": "Ray Data fixed costs (Ray start; actor start + model load before the first batch)",
         "compared with": "-", "ratio": None, "target": "(reported separately from steady state)", "met": None,
         "detail": (f"Ray start {_s(fixed['Ray start (init_ray), s'])} s; start-up per pipeline "
                    f"{_s(med('ray-1x1', 'startup_s'))} s on Ray vs {_s(med('local', 'startup_s'))} s local "
                    f"(model load {sum(median([x[k] for x in loads]) for k in ('decode', 'generate', 'score')):.1f} s "
                    f"in one process)")},
    ]
    return {"rows": rows, "breakdown": bd}


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def bench_scale(repeats: int, quick: bool = False) -> dict:
    """reconstruct() wall time for 1x, 2x, 4x rows (subjects x variants), local loop and Ray Data."""
    repeats = 1 if quick else max(1, repeats - 1)
    base, pre = _prepared_eval(quick)
    sizes = [{"label": "1x (1 subject x 2 variants)", "subjects": 1, "variants": ["L+I", "I"]},
             {"label": "2x (2 subjects x 2 variants)", "subjects": 2, "variants": ["L+I", "I"]},
             {"label": "4x (2 subjects x 4 variants)", "subjects": 2, "variants": ["L+I", "I", "L", "oracle"]}]
    sizes = [{**s, "subjects": list(range(1, s["subjects"] + 1))} for s in sizes]
    docs: dict[str, list[dict]] = {"local": [], "ray": []}
    for r in range(repeats):
        for backend in (("local", "ray") if r % 2 == 0 else ("ray", "local")):
            docs[backend].append(probe("scale", {"run_dir": str(base), "overrides": pre, "backend": backend,
                                                 "sizes": sizes if r % 2 == 0 else sizes[::-1], "warmup": True}))
    bd: dict = {"config": {"rows at 1x": None, "runs per backend": repeats,
                           "warm-up": "one untimed 1x call per process first (imports, first Ray Data run)",
                           "what is timed": "reconstruct() end to end (rows, LDM/judge cache hits, pipeline, shards)"}}
    rows = []
    for backend in ("local", "ray"):
        per = {}
        for d in docs[backend]:
            for s in d["sizes"]:
                per.setdefault(s["label"], {"rows": s["rows"], "wall": []})["wall"].append(s["wall_s"])
        labels = [s["label"] for s in sizes]
        xs = [per[lab]["rows"] for lab in labels]
        ys = [median(per[lab]["wall"]) for lab in labels]
        a, b = _fit(xs, ys)
        bd["config"]["rows at 1x"] = xs[0]
        bd[backend] = {**{f"{lab}: {per[lab]['rows']} rows, wall (median), s": median(per[lab]["wall"]) for lab in labels},
                       "fixed part a of a + b*rows, s": a, "per-row part b, ms": b * 1e3}
        if backend == "ray":
            bd[backend]["Ray start (once per process, not in the walls), s"] = median([d["ray_start_s"] for d in docs["ray"]])
        bd[backend]["warm-up call (median), s"] = median([d.get("warmup_s") for d in docs[backend]])
        rows.append({"what": f"reconstruct + score ({backend}), 4x rows (2 subjects x 4 variants) vs 1x (1 x 2)",
                     "compared with": f"1x rows ({xs[0]} images)", "ratio": ys[2] / ys[0] if ys[0] else None,
                     "target": "(growth; 4.0x = linear, less = fixed costs amortised)", "met": None,
                     "detail": f"{_s(ys[0])} / {_s(ys[1])} / {_s(ys[2])} s for {xs[0]} / {xs[1]} / {xs[2]} rows; "
                               f"fit {a:.1f} s + {b * 1e3:.0f} ms per row"})
    return {"rows": rows, "breakdown": bd}


def bench_scoring(repeats: int, quick: bool = False) -> dict:
    """Per-image cost of scoring with the field's suite against the three metrics alone, same images, one run."""
    base, pre = _prepared_eval(quick)
    variants = ["I", "L", "B", "B+I", "L+I", "oracle", "other-class"]
    doc = probe("scoring", {"run_dir": str(base), "overrides": pre, "variants": variants, "subjects": [1],
                            "threads": 2, "repeats": 3 if quick else max(5, 2 * repeats)})
    plain, suite = median(doc["times_s"]["plain"]), median(doc["times_s"]["suite"])
    n = doc["images"]
    ratio = suite / plain if plain else None
    met = ratio is not None and ratio <= 1.5
    row = {"what": "scoring with the field's suite (PixCorr, SSIM and PixCorr against a mismatched ground truth, "
                   "two-way identification and FID/KID features on the judge CNN's pooled features), per image, "
                   "demo --quick sizes (32 px, judge CNN), 2 threads",
           "compared with": "the same Score with the three metrics before the suite (N-way ACC, IS probabilities, "
                            "SSIM), on the same generated images",
           "ratio": ratio, "target": "<= 1.5x the time", "met": met,
           "detail": (f"median {1e3 * suite / n:.2f} ms vs {1e3 * plain / n:.2f} ms per image over "
                      f"{len(doc['times_s']['plain'])} interleaved passes of {n} images (batches of "
                      f"{doc['batch_size']}); added columns: {', '.join(doc['suite_columns'])}")}
    if not met:
        row["why"] = ("at 32 px with the judge CNN the three metrics cost well under a millisecond per image, so the "
                      "suite's fixed per-batch work (PixCorr's smoothing of the generation, the cross moment of the "
                      "mismatched SSIM, the gallery correlations, Python bookkeeping) is a large share; ground-truth "
                      "sides (PixCorr sums, SSIM moments, the true class, gallery features) are computed once per "
                      "image, and PixCorr uses the linear maps of its two resizes instead of 425 px float64 images "
                      "(62x dearer before). At real sizes the feature networks dominate instead")
    old = median(doc["times_s"].get("plain-conv") or [])
    fix = {"what": "SSIM's window filter as avg_pool2d (uniform window) / weighted sums of shifted views (same "
                   "numbers to ~1e-13), idle machine",
           "compared with": "the float64 grouped conv2d it replaces (before), the plain scorer, same images",
           "ratio": old / plain if old and plain else None,
           "target": "(before/after, time: not slower idle; the change is for shared cores, where the grouped conv "
                     "measured 40x slower at load 7)",
           "met": bool(old and plain and old / plain >= 0.9),
           "detail": f"median {1e3 * (old or 0) / n:.2f} ms vs {1e3 * plain / n:.2f} ms per image (ACC, IS, SSIM)"}
    return {"rows": [row, fix], "breakdown": {"images": n, "batch size": doc["batch_size"], "threads": 2,
                                              **{f"{k} pass times, s": [round(x, 4) for x in v]
                                                 for k, v in doc["times_s"].items()}}}
