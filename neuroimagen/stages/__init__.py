"""The three trained stages of NeuroImagen, in dependency order.

    encoder   stage 1  EEG encoder f_theta, triplet loss                 (needs: data)
    saliency  stage 2  saliency GAN G(z, f_theta(x))                     (needs: encoder)
    semantic  stage 3  EEG -> label-caption embedding regressor (L)    (needs: data, text encoder;
                                                                          uses the encoder to initialise)
    semantic_image     EEG -> per-image-caption embedding regressor (B), same settings (stages.semantic)
"""

from __future__ import annotations

STAGE_ORDER = ("encoder", "saliency", "semantic", "semantic_image")
REQUIRES = {"encoder": (), "saliency": ("encoder",), "semantic": (), "semantic_image": ()}
IMAGE_MODE = {"encoder": "none", "saliency": "path", "semantic": "none", "semantic_image": "none"}
CAPTION_KIND = {"semantic": "label", "semantic_image": "image"}


def stage_config(cfg, name: str):
    """The config section of a stage (both semantic regressors share ``stages.semantic``)."""
    return getattr(cfg.stages, "semantic" if name in CAPTION_KIND else name)


def stage_class(name: str):
    if name == "encoder":
        from neuroimagen.stages.encoder import EncoderStage

        return EncoderStage
    if name == "saliency":
        from neuroimagen.stages.saliency import SaliencyStage

        return SaliencyStage
    if name == "semantic":
        from neuroimagen.stages.semantic import SemanticStage

        return SemanticStage
    if name == "semantic_image":
        from neuroimagen.stages.semantic import SemanticImageStage

        return SemanticImageStage
    raise ValueError(f"unknown stage '{name}' (known: {', '.join(STAGE_ORDER)})")


def epochs_of(cfg, name: str) -> tuple[int, int]:
    """(epochs, val_every) of a stage."""
    sc = stage_config(cfg, name)
    return sc.epochs, sc.val_every


def build_stage(name: str, cfg, ctx, inputs: dict):
    """Build stage ``name`` on this process; loads the data splits here if the caller did not."""
    if "splits" not in inputs:
        from neuroimagen.data.datasets import load_splits

        inputs = dict(inputs, splits=load_splits(cfg.data, image_mode=IMAGE_MODE[name]))
    return stage_class(name)(cfg, ctx, inputs)
