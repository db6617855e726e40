"""Compute efficiency: achieved FLOP/s of a GAN training step vs an fp32 matmul peak; GPU options vs fp32."""

from __future__ import annotations

from bench_common import median, prepared, probe
from bench_train import demo_preset

# A twin with 64 px images, so the stage's default 64 px resolution can be measured too.
_TWIN64 = ["synth.classes=6", "synth.images_per_class=20", "synth.subjects=2", "synth.channels=16",
           "synth.image_size=64", "data.image_size=64"]
_CASES = {
    "stage defaults (64 px, G/D width 64, z 128, batch 32)": [],
    "demo preset (32 px, G/D width 16, z 32, batch 16)": [s for s in demo_preset() if s.startswith("stages.saliency.")],
}


def bench_flops(repeats: int, quick: bool = False) -> dict:
    """Counted FLOPs (torch.utils.flop_counter, forward + backward of D and G as the stage steps them) divided by
    the median step time, against the median time of an n x n fp32 matmul in the same process."""
    base = prepared("twin64", {"overrides": _TWIN64})
    # the default-size step is ~144 GFLOP (several seconds on 2 cores): fewer of those
    steps = {k: (2 if quick else 2 + repeats) if "defaults" in k else (4 if quick else 5 + 3 * repeats) for k in _CASES}
    doc = probe("flops", {"run_dir": str(base), "threads": 0, "steps": steps, "matmul_n": 2048,
                          "matmul_repeats": 3 if quick else 5, "cases": {k: _TWIN64 + v for k, v in _CASES.items()}})
    peak = max(doc["peak_before"]["flops_per_s"], doc["peak_after"]["flops_per_s"])
    bd = {"config": {"torch threads": doc["threads"], "matmul": f"{doc['peak_before']['n']}^2 fp32, 2 n^3 FLOPs",
                     "steps timed per case": ", ".join(f"{k}: {v}" for k, v in steps.items()), "counted": "matmul/conv FLOPs of one train_step (D step + G step)"},
          "peak": {"matmul GFLOP/s before the steps": doc["peak_before"]["flops_per_s"] / 1e9,
                   "matmul GFLOP/s after the steps": doc["peak_after"]["flops_per_s"] / 1e9}}
    rows = []
    for case, c in doc["cases"].items():
        frac = c["flops_per_s"] / peak
        bd[case] = {"GFLOP per step": c["flops_per_step"] / 1e9, "step (median), ms": median(c["step_s"]) * 1e3,
                    "achieved GFLOP/s": c["flops_per_s"] / 1e9, "fraction of peak": frac, "batch": c["batch"]}
        met = frac >= 0.25
        rows.append({"what": f"achieved FLOP/s of a saliency-GAN training step, {case}",
                     "compared with": f"fp32 {doc['peak_before']['n']}x{doc['peak_before']['n']} matmul peak, same run",
                     "ratio": frac, "target": ">= 0.25 of peak (aim)", "met": met,
                     "detail": f"{c['flops_per_s'] / 1e9:.1f} of {peak / 1e9:.1f} GFLOP/s "
                               f"({c['flops_per_step'] / 1e9:.2f} GFLOP per step in {median(c['step_s']) * 1e3:.0f} ms)",
                     **({} if met else {"why": "the step is many small convolutions (few channels, small images) plus "
                                               "element-wise work the counter does not count (DiffAugment, SSIM, hinge "
                                               "losses, Adam updates); small convolutions run far below a large matmul's "
                                               "throughput on 2 CPU threads. The larger the model, the nearer the peak."})})
    return {"rows": rows, "breakdown": bd}


_GPU_OPTIONS = {"train.precision=bf16": ["train.precision=bf16"], "train.channels_last=true": ["train.channels_last=true"],
                "train.compile=true": ["train.compile=true"]}


def bench_gpu(repeats: int, quick: bool = False) -> dict:
    """GPU options (bf16 autocast, channels_last, torch.compile; SDPA vs eager attention) vs the fp32 default."""
    import torch

    names = list(_GPU_OPTIONS) + ["ldm.attention=sdpa (vs eager)"]
    if not torch.cuda.is_available():
        return {"rows": [{"what": f"GPU option {n}", "compared with": "fp32 default, GAN training step" if n.startswith("train.")
                          else "ldm.attention=eager, one Generate batch", "ratio": None, "target": "(speed-up, reported)",
                          "met": None, "detail": "not measured: no GPU on this machine"} for n in names],
                "breakdown": {"gpu": {"status": "not measured: no GPU on this machine"}}}
    from bench_data import _prepared_eval

    base = prepared("twin64", {"overrides": _TWIN64})
    ev, ev_pre = _prepared_eval(quick)
    steps = 5 if quick else 10 + 5 * repeats
    gan = {"fp32": [], **_GPU_OPTIONS}
    doc = probe("gpu", {"run_dir": str(base), "overrides": _TWIN64, "steps": steps, "warmup": 3, "warmup_compile": 10,
                        "gan_options": gan, "ldm_run_dir": str(ev), "ldm_overrides": ev_pre,
                        "ldm_variants": ["L+I", "L"]})
    rows, bd = [], {"config": {"device": doc["device"], "steps": steps, "GAN": "stage defaults (64 px, width 64, batch 32)"}}
    ref = median(doc["gan"]["fp32"].get("step_s", []))
    for name in _GPU_OPTIONS:
        g = doc["gan"][name]
        t = median(g.get("step_s", []))
        bd[name] = {"step (median), ms": t * 1e3 if t else None, "error": g.get("error")}
        rows.append({"what": f"GPU option {name}, GAN training step", "compared with": "fp32 default",
                     "ratio": ref / t if t and ref else None, "target": "(speed-up, reported)", "met": None,
                     "detail": (f"{t * 1e3:.1f} ms vs {ref * 1e3:.1f} ms per step on {doc['device']}" if t and ref
                                else f"not measured: {g.get('error', 'no timing')}")})
    s, e = (median(doc["ldm"].get(k, {}).get("batch_s", [])) for k in ("sdpa", "eager"))
    bd["ldm.attention"] = {"sdpa batch (median), s": s, "eager batch (median), s": e}
    rows.append({"what": "GPU option ldm.attention=sdpa, one Generate batch", "compared with": "ldm.attention=eager",
                 "ratio": e / s if s and e else None, "target": "(speed-up, reported)", "met": None,
                 "detail": f"{s * 1e3:.0f} ms vs {e * 1e3:.0f} ms per batch" if s and e else
                           f"not measured: {doc['ldm'].get('sdpa', {}).get('error') or doc['ldm'].get('eager', {}).get('error')}"})
    return {"rows": rows, "breakdown": bd}
