"""Train stages 1-3 as a Ray job:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train.py --config configs/quick.yaml --out /shared/runs/quick [--set key=value ...] [--stages encoder,saliency]

The job joins the cluster it runs on (RAY_ADDRESS is set by the job server) and calls the same
function as ``neuroimagen train``. Errors a user can cause print one line and exit 2; so does a second
job or command on the same ``--out`` while this one runs (the run directory's ``.lock``, held by this
driver process only).
"""

from __future__ import annotations

import sys

from neuroimagen.cli import main as cli_main


def main(argv=None) -> None:
    cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
