"""Ablation run (paper Table 3 and its references) as a Ray job:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/ablation.py --config configs/quick.yaml --out /shared/runs/quick [--variants I,L,B,B+I,L+I] \\
        [--subjects 1,2] [--set key=value ...]

Trains every stage the requested variants need that the run directory does not have yet (Ray Train),
reconstructs and scores all subjects x variants (Ray Data), and writes ``report/report.md``. Re-submitting
the same command resumes: finished stages and finished (subject, variant) shards are reused. Errors a user
can cause print one line and exit 2; so does a second job or command on the same ``--out`` while this one
runs (the run directory's ``.lock``, held by this driver process only).
"""

from __future__ import annotations

import sys

from neuroimagen.cli import main as cli_main


def main(argv=None) -> None:
    cli_main(["ablation", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
