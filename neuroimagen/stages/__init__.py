"""The three trained stages of NeuroImagen, in dependency order.

    encoder   stage 1  EEG encoder f_theta, triplet loss                 (needs: data)
    saliency  stage 2  saliency GAN G(z, f_theta(x))                     (needs: encoder)
    semantic  stage 3  EEG -> caption embedding regressor               (needs: data, text encoder;
                                                                          uses the encoder to initialise)
"""

from __future__ import annotations

STAGE_ORDER = ("encoder", "saliency", "semantic")
REQUIRES = {"encoder": (), "saliency": ("encoder",), "semantic": ()}
IMAGE_MODE = {"encoder": "none", "saliency": "path", "semantic": "none"}


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
    raise ValueError(f"unknown stage '{name}' (known: {', '.join(STAGE_ORDER)})")


def epochs_of(cfg, name: str) -> tuple[int, int]:
    """(epochs, val_every) of a stage."""
    sc = getattr(cfg.stages, name)
    return sc.epochs, sc.val_every


def build_stage(name: str, cfg, ctx, inputs: dict):
    """Build stage ``name`` on this process; loads the data splits here if the caller did not."""
    if "splits" not in inputs:
        from neuroimagen.data.datasets import load_splits

        inputs = dict(inputs, splits=load_splits(cfg.data, image_mode=IMAGE_MODE[name]))
    return stage_class(name)(cfg, ctx, inputs)
