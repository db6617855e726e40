"""The three trained stages of NeuroImagen, in dependency order: the one stage table.

    encoder   stage 1  EEG encoder f_theta, triplet loss                 (needs: data)
    saliency  stage 2  saliency GAN G(z, f_theta(x))                     (needs: encoder)
    semantic  stage 3  EEG -> label-caption embedding regressor (L)    (needs: data, text encoder;
                                                                          uses the encoder to initialise)
    semantic_image     EEG -> per-image-caption embedding regressor (B), same settings (stages.semantic)
    clip_image         optional (stages.clip_image.enabled): EEG aligned to the stimuli's CLIP image embeddings,
                       symmetric InfoNCE (NICE / ATM); scored by zero-shot retrieval  (needs: data, a CLIP vision
                       model; uses the encoder to initialise)

What a stage *is* (its requirements, config section, data, caption kind, selection metric, protocol) is
declared once, on its class; ``STAGES`` lists the classes in dependency order. ``fit_stage`` is the one
"build the stage and run ``fit()``" that the local backend, every Ray Train worker and every Ray Tune trial call;
``stage_guards`` the checks every exported stage is put through (did it learn; stage 2: did G collapse; stage 3:
does it beat shuffled EEG).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from neuroimagen.data.datasets import load_splits
from neuroimagen.stages.base import Stage
from neuroimagen.stages.clip_image import ClipImageStage
from neuroimagen.stages.encoder import EncoderStage
from neuroimagen.stages.saliency import SaliencyStage
from neuroimagen.stages.semantic import SemanticImageStage, SemanticStage
from neuroimagen.training.context import RunContext
from neuroimagen.training.loop import FitResult, Reporter, fit, learning_guard
from neuroimagen.training.tracking import open_tracker

STAGES: dict[str, type[Stage]] = {cls.name: cls for cls in (EncoderStage, SaliencyStage, SemanticStage, SemanticImageStage,
                                                          ClipImageStage)}
STAGE_ORDER = tuple(STAGES)
# caption kind ('label' | 'image') -> the stage that regresses it (what reconstruction's variants read)
SEMANTIC_STAGE = {cls.caption_kind: name for name, cls in STAGES.items() if cls.caption_kind}


def stage_class(name: str) -> type[Stage]:
    if name not in STAGES:
        raise ValueError(f"unknown stage '{name}' (known: {', '.join(STAGE_ORDER)})")
    return STAGES[name]


def stage_enabled(cfg, name: str) -> bool:
    """Whether stage ``name`` is in the default stage list: every stage but the optional ``clip_image``, which is in
    it when ``stages.clip_image.enabled``."""
    return name != "clip_image" or bool(cfg.stages.clip_image.enabled)


def stage_config(cfg, name: str):
    """The config section of a stage (both semantic regressors share ``stages.semantic``)."""
    return getattr(cfg.stages, stage_class(name).config_section)


def epochs_of(cfg, name: str) -> tuple[int, int]:
    """(epochs, val_every) of a stage."""
    sc = stage_config(cfg, name)
    return sc.epochs, sc.val_every


def protocol_of(cfg, name: str) -> str:
    """How stage ``name``'s validation metrics are computed, with its settings filled in."""
    cls = stage_class(name)
    return cls.protocol.format(sc=stage_config(cfg, name), cap=cls.caption_kind or "")


def build_stage(name: str, cfg, ctx: RunContext, inputs: dict) -> Stage:
    """Build stage ``name`` on this process; loads the data splits here if the caller did not."""
    cls = stage_class(name)
    if "splits" not in inputs:
        inputs = dict(inputs, splits=load_splits(cfg.data, image_mode=cls.image_mode))
    return cls(cfg, ctx, inputs)


def fit_stage(name: str, cfg, ctx: RunContext, reporter: Reporter, inputs: dict, *,
              fault_marker: Optional[Path] = None, log: Optional[Callable[[str], None]] = None,
              tensorboard: Optional[Path] = None) -> FitResult:
    """Build stage ``name`` and train it with the one ``fit()`` (resuming from ``reporter``).

    ``tensorboard``: the folder of this stage's event files (``neuroimagen.training.tracking``); rank 0 writes them
    when ``train.tensorboard`` is on."""
    stage = build_stage(name, cfg, ctx, inputs)
    epochs, val_every = epochs_of(cfg, name)
    tracker = open_tracker(tensorboard, cfg.train.tensorboard and ctx.is_main)
    try:
        return fit(stage, ctx, reporter, epochs=epochs, val_every=val_every, seed=cfg.seed,
                   fault_epoch=cfg.train.fault_injection_epoch, fault_marker=fault_marker, log=log, tracker=tracker)
    finally:
        if tracker is not None:
            tracker.close()


def stage_guards(name: str, best: dict, history: list[dict], data: dict) -> dict:
    """The guards of stage ``name``'s exported epoch: ``did_not_learn`` (every stage,
    ``neuroimagen.training.loop.learning_guard``) and the stage's own (``Stage.guards``: ``collapsed`` for the
    saliency GAN, ``ignores_eeg`` for the semantic regressors).

    ``best``/``history`` as ``fit()`` keeps them, ``data`` the checkpoint's data description. Returns
    ``{'fired': [names], 'warning': one line or None, <name>: {..numbers.., 'fired': bool, 'reason': str}}``.
    """
    checks = {"did_not_learn": learning_guard(best, history), **stage_class(name).guards(data, best.get("metrics", {}))}
    fired = [k for k, g in checks.items() if g["fired"]]
    warning = (f"[{name}] guard: " + "; ".join(f"{k.replace('_', ' ')}: {checks[k]['reason']}" for k in fired)
               if fired else None)
    return {"fired": fired, "warning": warning, **checks}
