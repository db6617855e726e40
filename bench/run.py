"""neuroimagen benchmarks: every figure is a ratio measured side by side in one run (medians).

    python bench/run.py [--only io,cli] [--repeats 5] [--out bench/RESULTS.md]

Results go to bench/RESULTS.md with the machine described. Absolute times are printed for context
only; the targets are on the ratios, which survive a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, no GPU used; Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), {platform.system()} {platform.machine()}")


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_io(repeats: int) -> list[dict]:
    """Reading an EEG-ImageNet-layout file into Datasets vs a bare torch.load of the same file."""
    import torch

    from neuroimagen.config import SynthConfig, load_config
    from neuroimagen.data.datasets import load_recording
    from neuroimagen.data.synthetic import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "twin"
        # Real channel count (128) and lengths; 10 classes x 25 images x 2 subjects = 500 segments, ~130 MB.
        synthesize(root, SynthConfig(classes=10, images_per_class=25, subjects=2, channels=128, image_size=16),
                   show_progress=False)
        cfg = load_config(root / "config.yaml").data
        path = cfg.eeg
        size_mb = Path(path).stat().st_size / 2**20
        bare, ours = [], []
        for _ in range(repeats):  # interleave so drift hits both sides alike
            bare += timed(lambda: torch.load(path, map_location="cpu", weights_only=True), 1)
            ours += timed(lambda: load_recording(cfg, check_images=True), 1)
        mb, mo = statistics.median(bare), statistics.median(ours)
        return [{"what": f"read EEG-ImageNet-layout file ({size_mb:.0f} MB, 500 x 128 x ~505) into a validated Recording "
                         f"(splits, length filter, NaN check, image check)",
                 "compared with": "bare torch.load(weights_only=True) of the same file",
                 "ratio": mo / mb, "target": "<= 1.25x the time", "met": mo / mb <= 1.25,
                 "detail": f"median {mo * 1e3:.0f} ms vs {mb * 1e3:.0f} ms over {repeats} runs",
                 "why": "the reader does two memory-bound passes a bare load does not: the NaN/Inf check "
                        "reads every kept segment once more (one sum per segment, ~13 ms per 128 MB here) and the "
                        "split file is a second torch.load; the Python validation loop adds a few ms. Skipping the "
                        "NaN check would meet the target but let non-finite EEG reach training."}]


def bench_cli(repeats: int) -> list[dict]:
    """`neuroimagen --help` vs `python -c pass` (process start-up included on both sides)."""
    exe = [sys.executable, "-m", "neuroimagen.cli", "--help"]
    base = [sys.executable, "-c", "pass"]
    a, b = [], []
    for _ in range(repeats):
        b += timed(lambda: subprocess.run(base, check=True, capture_output=True), 1)
        a += timed(lambda: subprocess.run(exe, check=True, capture_output=True), 1)
    extra = statistics.median(a) - statistics.median(b)
    return [{"what": "`neuroimagen --help`", "compared with": "`python -c pass`", "ratio": statistics.median(a) / statistics.median(b),
             "target": "<= 0.5 s extra", "met": extra <= 0.5,
             "detail": f"{extra * 1e3:.0f} ms extra (median {statistics.median(a) * 1e3:.0f} ms vs {statistics.median(b) * 1e3:.0f} ms)"}]


BENCHES = {"io": bench_io, "cli": bench_cli}


def render(rows: list[dict], mach: str, cmd: str) -> str:
    lines = ["# neuroimagen benchmarks", "",
             f"Machine: {mach}.", "",
             f"Command: `{cmd}`. Each ratio is measured side by side in one run (medians, interleaved).", "",
             "| what | compared with | ratio | target | met | detail |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['compared with']} | {r['ratio']:.2f}x | {r['target']} | "
                     f"{'yes' if r['met'] else '**no**'} | {r['detail']} |")
    missed = [r for r in rows if not r["met"]]
    if missed:
        lines += ["", "## Missed targets, and why", ""]
        lines += [f"- {r['what']}: {r.get('why', 'not yet analysed')}" for r in missed]
    lines += ["", "Rows for training, Ray Data and the demo are added as those parts land.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of: " + ", ".join(BENCHES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args()
    rows = []
    for name in args.only.split(","):
        print(f"running {name} ...", file=sys.stderr)
        rows += BENCHES[name](args.repeats)
    for r in rows:
        print(json.dumps(r))
    text = render(rows, machine(), "python bench/run.py " + " ".join(sys.argv[1:]))
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
