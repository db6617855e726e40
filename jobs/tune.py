"""A sweep as a Ray job:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/tune.py --space tune_spaces/gan.yaml --out /shared/runs/tune-gan [--config ...] [--set key=value ...]
    ray job submit ... -- python jobs/tune.py --resume /shared/runs/tune-gan

Calls the same function as ``neuroimagen tune``: one driver function per trial fits its own
``TorchTrainer``; ASHA stops weak trials; results, ``best.yaml`` and ``trials.png`` land in ``--out``.
Errors a user can cause print one line and exit 2; so does a second sweep on the same ``--out`` while
this one runs (the sweep directory's ``.lock``, held by this driver process, never by the trials).
"""

from __future__ import annotations

import sys

from neuroimagen.cli import main as cli_main


def main(argv=None) -> None:
    cli_main(["tune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
