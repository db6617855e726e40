"""Ray Data: reconstruction and scoring of many rows across actors (DESIGN sec. 6).

    eval.pipeline: fused (default)
    from_items(rows) -> map_batches(Reconstruct) ``eval.actors`` actors (a whole GPU each with eval.use_gpu), each
                                              running Decode -> Generate -> Score on its batches
                     -> iter_batches on the driver, which writes each (subject, variant) shard when complete

    eval.pipeline: staged
    from_items(rows) -> map_batches(Decode)   one CPU actor: EEG -> saliency map + prompt embedding
                     -> map_batches(Generate) ``eval.actors`` actors, 0.75 GPU each when ``eval.use_gpu``:
                                              the frozen LDM, loaded once per actor
                     -> map_batches(Score)    one actor (a quarter GPU with eval.use_gpu): classifier, N-way
                                              hits, SSIM, PNGs
                     -> iter_batches on the driver, which writes each (subject, variant) shard when complete

The callables are the plain classes of ``neuroimagen.reconstruction``, loaded in each actor by
``neuroimagen.reconstruction.factory`` (``*FromRun``: the typed config is serialised once here, on the
driver, and rebuilt once per actor); this module only wires them. Decode and Score ask for half a CPU each
so that on a 2-core machine (a local instance declares 4 logical CPUs) the generation actors never starve
the stages around them.

A dead actor (OOM, lost node, ``eval.fault_injection_batch``) is restarted and its in-flight batches are
retried: Ray Data 2.60 creates pool actors with ``max_restarts=-1, max_task_retries=-1`` unless told
otherwise (``ActorPoolMapOperator._apply_default_remote_args``). Delivery is therefore at least once;
the driver keys rows by (item, sample) per shard, so a re-delivered row is written once.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import ray
import ray.data
from ray.data import ActorPoolStrategy

from neuroimagen.config import Config, to_dict
from neuroimagen.distributed.train import init_ray
from neuroimagen.reconstruction.factory import (
    DecodeFromRun,
    GenerateFromRun,
    ReconstructFromRun,
    RunSources,
    ScoreFromRun,
)


def build_dataset(rows: list[dict], cfg: Config, sources: RunSources) -> "ray.data.Dataset":
    """The lazy Dataset of scored rows (nothing runs until it is iterated)."""
    ec = cfg.eval
    B = ec.batch_size
    kw = {"cfg": to_dict(cfg), "sources": sources.to_dict()}  # serialised once; each actor rebuilds the Config once
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // B, 64)))
    if ec.pipeline == "fused":
        return ds.map_batches(ReconstructFromRun, fn_constructor_kwargs=kw, batch_size=B, batch_format="numpy",
                              compute=ActorPoolStrategy(size=ec.actors), num_cpus=1, num_gpus=1 if ec.use_gpu else 0)
    ds = ds.map_batches(DecodeFromRun, fn_constructor_kwargs=kw, batch_size=B, batch_format="numpy",
                        compute=ActorPoolStrategy(size=1), num_cpus=0.5)
    ds = ds.map_batches(GenerateFromRun, fn_constructor_kwargs=kw, batch_size=B, batch_format="numpy",
                        compute=ActorPoolStrategy(size=ec.actors), num_cpus=1, num_gpus=0.75 if ec.use_gpu else 0)
    # With GPUs, a generation actor takes 0.75 of one and the scoring actor 0.25, so eval.actors = the number of
    # GPUs always leaves room for scoring (whole GPUs for both would deadlock when actors == GPUs).
    return ds.map_batches(ScoreFromRun, fn_constructor_kwargs=kw, batch_size=B, batch_format="numpy",
                          compute=ActorPoolStrategy(size=1), num_cpus=0.5, num_gpus=0.25 if ec.use_gpu else 0)


def run_on_ray(rows: list[dict], cfg: Config, sources: RunSources, on_batch: Callable[[dict], None],
               progress: bool = True) -> None:
    """``RunRows`` on Ray Data (``eval.backend: ray``): joins or starts Ray, runs the pipeline over ``rows`` and
    hands every scored batch to ``on_batch`` on the driver."""
    init_ray(cfg)
    # One torch thread per actor (the one CPU it reserves): measured 2x the images/s of cores/actors threads
    # on 2 cores, whose OpenMP team stalls whenever the driver or Ray's own processes take a core.
    sources = sources if sources.threads else dataclasses.replace(sources, threads=1)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(progress)
    ds = build_dataset(rows, cfg, sources)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        on_batch(batch)
