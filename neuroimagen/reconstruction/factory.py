"""Stage 4's callables loaded from a run directory and its typed config: the one place stage 4 reads files.

:class:`RunSources` names what a run's reconstruction loads (plain, json-able values): the exported stage
models, the diffusion snapshot, the classifier spec and where the PNGs go. ``load_decode`` /
``load_generate`` / ``load_score`` / ``load_reconstruct`` turn ``(Config, RunSources)`` into the plain
callables of this package; the local loop calls them directly.

A Ray Data actor runs in a process of its own: :class:`DecodeFromRun` and its siblings take the config as
the dict the driver serialised once (``to_dict``) and rebuild the typed ``Config`` once, in their
constructor, then load their components; every batch after that is only a call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from neuroimagen.config import Config, from_dict
from neuroimagen.data.datasets import load_recording
from neuroimagen.errors import ConfigError
from neuroimagen.models.classifier import Classifier, load_classifier, load_is_network, load_torchvision_classifier
from neuroimagen.models.feature_nets import (
    load_alexnet,
    load_clip_vision,
    load_efficientnet_b1,
    load_inception_v3,
    load_swav_resnet50,
)
from neuroimagen.models.ldm import load_img2img
from neuroimagen.models.text_encoder import TextEncoder, load_text_encoder
from neuroimagen.reconstruction.decode import Decode
from neuroimagen.reconstruction.generate import Generate
from neuroimagen.reconstruction.images import PngWriter
from neuroimagen.reconstruction.reconstruct import Reconstruct
from neuroimagen.reconstruction.rows import SEMANTIC_STAGE
from neuroimagen.reconstruction.score import Score
from neuroimagen.reconstruction.suite import Suite
from neuroimagen.stages.encoder import build_from_spec
from neuroimagen.stages.semantic import text_encoder_for
from neuroimagen.training.checkpoint import load_model_dir

FAULT_MARKER = Path("results") / "fault-injected-batch"


@dataclass(frozen=True)
class RunSources:
    """What a run's stage 4 loads, as plain values (they cross to every Ray actor with the serialised config).

    run_dir: the run directory (PNGs under ``results/images``, the fault-injection marker).
    models: stage -> its exported model directory, for the stages the variants need (:func:`stage_models`).
    snapshot: the Stable Diffusion snapshot directory (pretrained, or the cached tiny LDM).
    classifier: the classifier spec, ``{'kind': 'judge', 'path'}`` or ``{'kind': 'torchvision', 'arch',
        'weights', 'image_size', 'class_names', 'classes_file'}``.
    is_network: the Inception Score network's spec, ``{'kind': 'inception', 'weights', 'sha256'}``, or empty (the
        IS is then computed from the classifier's probabilities).
    gallery: subject -> the distinct ground-truth image paths of its evaluated trials (the suite's two-way
        identification and chance baselines compare against them); empty: no suite.
    device: where the pipeline and the classifier run (``cuda`` with ``eval.use_gpu``).
    threads: torch threads of the process that generates (0: leave torch's default).
    write_images: write the generated and init images as PNGs.
    """

    run_dir: str
    snapshot: str
    classifier: dict
    models: dict = field(default_factory=dict)
    is_network: dict = field(default_factory=dict)
    gallery: dict = field(default_factory=dict)
    device: str = "cpu"
    threads: int = 0
    write_images: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def stage_models(run_dir: str | Path, record: dict, stages: Sequence[str]) -> dict[str, str]:
    """Stage -> model directory, from a run record (``run.json``); a stage not trained is a ConfigError."""
    out = {}
    for stage in stages:
        entry = record["stages"].get(stage)
        if entry is None:
            raise ConfigError(f"{run_dir}: stage '{stage}' is not trained; run `neuroimagen train --out {run_dir} "
                              f"--stages {stage}` (or `neuroimagen reconstruct`, which trains what is missing)")
        out[stage] = str(Path(run_dir) / entry["model"])
    return out


def load_module(model_dir: str | Path, module: str) -> tuple[torch.nn.Module, dict]:
    """(module in eval mode without gradients, its spec) from an exported stage model directory."""
    doc, states = load_model_dir(model_dir)
    m = build_from_spec(doc["modules"][module])
    m.load_state_dict(states[module])
    return m.eval().requires_grad_(False), doc["modules"][module]


def check_text_encoder(models: Mapping[str, str], snapshot: str, snapshot_text_encoder: TextEncoder | None = None,
                       configured: str | None = None) -> None:
    """Refuse stage-3 regressors whose targets came from another text encoder than the diffusion model's own.

    A regressor predicts in the space of the text encoder that embedded its training captions; the diffusion
    model reads ``prompt_embeds`` in its own text encoder's space. Equal shapes prove nothing (every CLIP-L has
    77 x 768), so the weight fingerprint recorded with each exported regressor (``targets`` in its spec, see
    ``neuroimagen.stages.semantic``) must equal the fingerprint of ``snapshot``'s ``text_encoder/`` (+ tokenizer).
    ``models``: stage -> exported model directory (only the semantic stages are checked); ``snapshot_text_encoder``:
    the snapshot's encoder when already loaded; ``configured``: ``text_encoder.pretrained``, which Decode embeds
    the empty and the true captions with (the tiny default is the snapshot's by construction), checked the same
    way. One ``ConfigError`` line naming both encoders otherwise.
    """
    semantic = [(stage, models[stage]) for stage in SEMANTIC_STAGE.values() if stage in models]
    if not semantic and configured is None:
        return
    te = snapshot_text_encoder if snapshot_text_encoder is not None else load_text_encoder(snapshot)
    if configured is not None:
        other = load_text_encoder(configured)
        if other.fingerprint != te.fingerprint:
            raise ConfigError(f"text_encoder.pretrained: {configured} has other weights ({other.fingerprint}) than the "
                              f"text encoder of the diffusion model {snapshot} ({te.fingerprint}): caption embeddings "
                              f"would not be prompts for it; set text_encoder.pretrained to the diffusion snapshot")
    for stage, model_dir in semantic:
        doc, _ = load_model_dir(model_dir)
        rec = doc["modules"]["regressor"].get("targets") or {}
        trained = rec.get("text_encoder_fingerprint")
        if trained == te.fingerprint:
            continue
        what = (f"was trained on caption embeddings of text encoder {rec.get('text_encoder')} (weights {trained})"
                if trained else "records no text encoder for its targets (exported before they were recorded)")
        raise ConfigError(f"{model_dir}: stage-3 regressor '{stage}' {what}, but the diffusion model {snapshot} "
                          f"conditions on its own text encoder (weights {te.fingerprint}); set text_encoder.pretrained "
                          f"to the diffusion snapshot and retrain it (`neuroimagen train --out <run> --stages {stage}`)")


def load_classifier_spec(spec: Mapping) -> Classifier:
    """A ``Classifier`` from a plain spec: {'kind': 'judge', 'path': dir}, {'kind': 'torchvision', 'arch',
    'weights', 'image_size', 'class_names' (the WNIDs of ``classes_file``, or None)} or {'kind': 'inception',
    'weights', 'sha256'} (the Inception Score network)."""
    if spec["kind"] == "judge":
        return load_classifier(spec["path"])
    if spec["kind"] == "inception":
        return load_is_network(spec["weights"], sha256=spec.get("sha256"))
    names = spec.get("class_names")
    clf = load_torchvision_classifier(spec["arch"], spec["weights"], image_size=spec.get("image_size"))
    if names is not None:
        if len(names) != clf.num_classes:
            raise ConfigError(f"eval.classifier_classes: {spec.get('classes_file')}: lists {len(names)} classes, but "
                              f"{spec['weights']} ({spec['arch']}) has {clf.num_classes} outputs")
        clf.class_names = [str(n) for n in names]
    return clf


def load_decode(cfg: Config, src: RunSources) -> Decode:
    """Stage 1-3 modules (those in ``src.models``), the recording's EEG and captions, and the text encoder."""
    encoder = generator = None
    z_dim, res = cfg.stages.saliency.z_dim, cfg.stages.saliency.resolution
    if "saliency" in src.models:
        encoder, _ = load_module(src.models["encoder"], "encoder")
        generator, spec = load_module(src.models["saliency"], "generator")
        z_dim, res = spec["kwargs"]["z_dim"], spec["kwargs"]["resolution"]
    regressors = {kind: load_module(src.models[stage], "regressor")[0]
                  for kind, stage in SEMANTIC_STAGE.items() if stage in src.models}
    recording = load_recording(cfg.data, check_images=False)
    return Decode(segment=recording.segment, text=text_encoder_for(cfg), z_dim=z_dim, resolution=res,
                  encoder=encoder, generator=generator, regressors=regressors, captions=recording.captions)


def load_generate(cfg: Config, src: RunSources) -> Generate:
    """The img2img pipeline of ``src.snapshot`` on ``src.device`` (``ldm.dtype``, ``ldm.attention``)."""
    if src.threads:
        torch.set_num_threads(int(src.threads))
    if src.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("eval.use_gpu: true, but this worker has no CUDA device")
    lc = cfg.ldm
    pipe = load_img2img(src.snapshot, device=src.device, dtype=lc.dtype, attention_slicing=lc.attention_slicing,
                        attention=lc.attention)
    te = TextEncoder(pipe.tokenizer, pipe.text_encoder, identity=src.snapshot)
    return Generate(pipe, te.encode([""])[0], strength=lc.strength, guidance_scale=lc.guidance_scale,
                    num_inference_steps=lc.num_inference_steps, fault_batch=cfg.eval.fault_injection_batch,
                    fault_marker=Path(src.run_dir) / FAULT_MARKER)


# eval.suite key -> (loader, its feature keys, the metric of those keys)
SUITE_NETWORKS = {"alexnet": (load_alexnet, ("alexnet2", "alexnet5"), "twoway"),
                  "inception": (load_inception_v3, ("inception",), "twoway"),
                  "clip": (load_clip_vision, ("clip",), "twoway"),
                  "effnet": (load_efficientnet_b1, ("effnet",), "distance"),
                  "swav": (load_swav_resnet50, ("swav",), "distance")}


def suite_layout(cfg: Config, judge_features: bool) -> dict:
    """{'networks': {eval.suite key: path}, 'twoway': [...], 'distance': [...], 'fid': key or None} of a config;
    ``judge_features``: whether the classifier is a judge CNN (the embedded default's features)."""
    sc = cfg.eval.suite
    nets = {k: getattr(sc, k) for k in SUITE_NETWORKS if getattr(sc, k) is not None}
    twoway = ["judge"] if sc.judge_features and judge_features else []
    distance = []
    for k in nets:
        _, keys, metric = SUITE_NETWORKS[k]
        (twoway if metric == "twoway" else distance).extend(keys)
    fid = "inception" if sc.fid_network == "inception" else ("judge" if judge_features else None)
    return {"networks": nets, "twoway": twoway, "distance": distance, "fid": fid}


def load_suite(cfg: Config, src: RunSources, clf: Classifier) -> Suite | None:
    """The suite's feature networks (``eval.suite``, each loaded once, on ``src.device`` with a GPU) and the
    galleries of ``src.gallery``; None without a gallery."""
    if not src.gallery:
        return None
    layout = suite_layout(cfg, clf.has_features)
    extractors = {}
    if "judge" in layout["twoway"] or layout["fid"] == "judge":
        extractors["judge"] = lambda x: {"judge": clf.features(x)}
    for key, path in layout["networks"].items():
        net = SUITE_NETWORKS[key][0](path)
        if src.device.startswith("cuda") and torch.cuda.is_available():
            net.to(src.device)
        extractors[key] = net.extract
    return Suite(extractors, twoway=layout["twoway"], distance=layout["distance"], fid=layout["fid"],
                 load_gt=lambda p, s: torch.empty(0), gallery=src.gallery)


def load_score(cfg: Config, src: RunSources) -> Score:
    """The classifier of ``src.classifier``, the IS network of ``src.is_network`` (if any) and the suite's
    feature networks, each loaded once (on the GPU when there is one), and the run's PNG writer."""
    clf = load_classifier_spec(src.classifier)
    is_net = load_classifier_spec(src.is_network) if src.is_network else None
    if src.device.startswith("cuda") and torch.cuda.is_available():
        clf.to(src.device)  # a ViT-H/14 judge belongs on the GPU; probabilities come back on the CPU
        if is_net is not None:
            is_net.to(src.device)
    ec = cfg.eval
    return Score(clf, n_way=ec.n_way, top_k=ec.top_k, trials=ec.trials, ssim_convention=ec.ssim_convention,
                 ssim_resolution=ec.ssim_resolution, write_image=PngWriter(src.run_dir) if src.write_images else None,
                 is_network=is_net, suite=load_suite(cfg, src, clf))


def load_reconstruct(cfg: Config, src: RunSources) -> Reconstruct:
    return Reconstruct(load_decode(cfg, src), load_generate(cfg, src), load_score(cfg, src))


class _FromRun:
    """A callable loaded in its own process from the driver's serialised config (rebuilt here, once)."""

    load: Callable[[Config, RunSources], Callable[[dict], dict]]

    def __init__(self, cfg: dict, sources: dict):
        self.fn = type(self).load(from_dict(Config, cfg), RunSources(**sources))

    def __call__(self, batch: dict) -> dict:
        return self.fn(batch)


class DecodeFromRun(_FromRun):
    load = staticmethod(load_decode)


class GenerateFromRun(_FromRun):
    load = staticmethod(load_generate)


class ScoreFromRun(_FromRun):
    load = staticmethod(load_score)


class ReconstructFromRun(_FromRun):
    load = staticmethod(load_reconstruct)
