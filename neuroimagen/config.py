"""Typed, frozen configuration loaded from YAML with strict validation.

Every mistake is one ``ConfigError`` naming its dotted key::

    configs/x.yaml: stages.gan.alpha1: expected float >= 0, got 'abc'
    configs/x.yaml: data.formt: unknown key (did you mean 'format'?)
    --set data.split_num=abc: data.split_num: expected integer >= 0, got 'abc'

Relative paths in a YAML file are resolved against that file's folder (a config travels with its
data); paths given with ``--set`` are resolved against the working directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import math
import os
import threading
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from neuroimagen.atomic import write_text
from neuroimagen.errors import ConfigError

CONFIG_FILENAME = "config.yaml"
INT64 = (-(2**63), 2**63 - 1)  # integer fields end up in numpy / torch int64

# ---------------------------------------------------------------------------------------------
# Field helpers


def param(default: Any = dataclasses.MISSING, *, ge=None, gt=None, le=None, lt=None,
          path: bool = False, doc: str = "", default_factory: Any = dataclasses.MISSING):
    """A config field with optional numeric bounds, a path flag and a one-line doc."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "path": path, "doc": doc}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------
# Checked on construction

_READY = False  # set at the end of this module
_BUILDING = threading.local()  # from_dict is constructing: it checks the fields and validates with the dotted path


class Checked:
    """A config section checks its fields (types, bounds, choices) and runs its ``validate`` when constructed in
    code or by ``dataclasses.replace`` too, not only when loaded from YAML: ``Config(seed=-5)`` raises the same
    one-line ``ConfigError`` as ``seed: -5`` in a file. Lists become tuples and ints floats, as from YAML."""

    def __post_init__(self) -> None:
        if getattr(_BUILDING, "depth", 0) or not _READY:  # _READY: the module's own constants are built as it loads
            return
        cls = type(self)
        prefix = _section_paths().get(cls, cls.__name__.lower())
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(self, f.name)
            checked = _check_value(value, hints[f.name], dict(f.metadata), _join(prefix, f.name))
            if checked is not value:
                object.__setattr__(self, f.name, checked)
        if hasattr(self, "validate"):
            self.validate(prefix)


def _check_value(value: Any, tp: Any, meta: dict, dotted: str) -> Any:
    """``value`` of a field typed ``tp`` as ``_convert`` makes it, accepting section objects already built."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        raise _fail(dotted, tp, meta, value)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return None if value is None else _check_value(value, inner[0], meta, dotted)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, (list, tuple)):
            raise _fail(dotted, tp, meta, value)
        return tuple(_check_value(v, args[0], {}, f"{dotted}[{i}]") for i, v in enumerate(value))
    out = _convert(value, tp, meta, dotted)
    return value if out == value and type(out) is type(value) else out


@functools.lru_cache(maxsize=None)
def _section_paths() -> dict[type, str]:
    """Section class -> its dotted path in ``Config`` (the prefix of its errors)."""
    out: dict[type, str] = {}

    def walk(cls, prefix: str) -> None:
        out.setdefault(cls, prefix)
        for name, tp in _hints(cls).items():
            if dataclasses.is_dataclass(tp):
                walk(tp, _join(prefix, name))

    walk(Config, "")
    return out


# ---------------------------------------------------------------------------------------------
# The config tree

DataFormat = Literal["eeg-imagenet", "things-eeg"]


@dataclass(frozen=True)
class DataConfig(Checked):
    """Where the EEG, splits, images and captions are, and how segments are selected."""

    format: DataFormat = param("eeg-imagenet", doc="eeg-imagenet (Spampinato 2017) or things-eeg (Gifford 2022)")
    eeg: Optional[str] = param(None, path=True, doc="eeg-imagenet: one .pth file; things-eeg: folder with sub-XX/")
    splits: Optional[str] = param(None, path=True, doc="eeg-imagenet split file (block_splits_by_image_{all,single}.pth)")
    images: Optional[str] = param(None, path=True, doc="image root: <root>/<wnid>/<stem>.JPEG, or THINGS image_set/")
    captions: Optional[str] = param(None, path=True, doc="per-image captions, JSON {stem: caption} (BLIP or the twin's)")
    class_names: Optional[str] = param(None, path=True, doc="extra WNID -> name table (YAML/JSON mapping)")
    split_num: int = param(0, ge=0, doc="which of the split file's splits")
    split_semantics: Literal["auto", "all", "single"] = param(
        "auto", doc="_all: indices into the whole list; _single: into one subject's list; auto: from the file name")
    subjects: tuple[int, ...] = param((), doc="subjects to keep (empty = all)")
    min_length: int = param(450, ge=1, doc="eeg-imagenet: keep segments with min_length <= T <= max_length")
    max_length: int = param(600, ge=1, doc="eeg-imagenet: upper length bound (inclusive)")
    window: Optional[tuple[int, int]] = param(None, doc="time window [start, stop); null = [20, 460] for eeg-imagenet, all of T for things-eeg")
    image_size: int = param(64, ge=8, le=1024, doc="images are resized (short side) and centre-cropped to this")
    things_val_per_concept: int = param(1, ge=0, doc="things-eeg: training images per concept held out for validation")
    things_average_repetitions: bool = param(True, doc="things-eeg: average the repetitions of each training "
                                                       "(and validation) image; false: one segment per repetition")
    test_repetitions: Literal["average", "each"] = param("average", doc=(
        "things-eeg: the test images' repetitions (80 in the release) are averaged into one segment per image "
        "and subject, as NICE/ATM evaluate (average), or kept as one segment per repetition (each)"))
    holdout_subject: Optional[int] = param(None, ge=1, doc=(
        "leave-one-subject-out: train and validate on the other subjects' train / val trials, test on this "
        "subject's test trials only (eval.protocol: loso sets it per fold); null = every subject in every split"))

    def validate(self, prefix: str) -> None:
        if self.min_length > self.max_length:
            raise ConfigError(f"{prefix}.min_length: expected <= {prefix}.max_length ({self.max_length}), got {self.min_length}")
        if self.window is not None:
            start, stop = self.window
            if start < 0 or stop <= start:
                raise ConfigError(f"{prefix}.window: expected [start, stop) with 0 <= start < stop, got {list(self.window)}")
        if self.format == "things-eeg" and self.splits is not None:
            raise ConfigError(f"{prefix}.splits: not used by things-eeg (its train/test files fix the split); remove it")
        if len(set(self.subjects)) != len(self.subjects):
            raise ConfigError(f"{prefix}.subjects: expected distinct subject ids, got {list(self.subjects)}")
        if any(s < 1 for s in self.subjects):
            raise ConfigError(f"{prefix}.subjects: expected subject ids >= 1, got {list(self.subjects)}")
        if self.holdout_subject is not None and self.subjects:
            if self.holdout_subject not in self.subjects:
                raise ConfigError(f"{prefix}.holdout_subject: subject {self.holdout_subject} is not among "
                                  f"{prefix}.subjects {list(self.subjects)}")
            if len(self.subjects) < 2:
                raise ConfigError(f"{prefix}.holdout_subject: holding out subject {self.holdout_subject} leaves no "
                                  f"training subject ({prefix}.subjects is {list(self.subjects)})")

    def resolved_window(self) -> Optional[tuple[int, int]]:
        """The time window in samples; None means the whole segment."""
        if self.window is not None:
            return self.window
        return (20, 460) if self.format == "eeg-imagenet" else None


@dataclass(frozen=True)
class SynthConfig(Checked):
    """Parameters of the synthetic twin (``neuroimagen data synth``)."""

    format: DataFormat = param("eeg-imagenet", doc="layout to write")
    classes: int = param(10, ge=2, le=40, doc="number of classes (EEG-ImageNet WNIDs / concepts)")
    images_per_class: int = param(20, ge=10, doc="training-set images per class (eeg-imagenet: all images)")
    subjects: int = param(2, ge=1, le=10, doc="number of subjects")
    channels: int = param(32, ge=2, le=256, doc="EEG channels (real: 128 eeg-imagenet, 17 or 63 things-eeg)")
    image_size: int = param(64, ge=16, le=512, doc="side of the square stimulus images")
    snr: float = param(1.0, gt=0, doc="signal-to-noise ratio of the class/instance sources (std ratio)")
    seed: int = param(0, ge=0, doc="everything written is a function of this seed")
    times: int = param(100, ge=8, le=4096, doc="things-eeg: samples per segment (real: 100 or 250)")
    layout: Optional[Literal["17x100", "63x250"]] = param(None, doc=(
        "things-eeg: a released channels x samples layout, with its channel names: 17x100 (Gifford 2022's "
        "preprocessed release) or 63x250 (the NICE/ATM variant); null = synth.channels x synth.times"))
    test_classes: int = param(10, ge=1, le=38, doc=(
        "things-eeg: test concepts, disjoint from the synth.classes training concepts, one image each (real: 200 "
        "test vs 1654 training concepts); classes + test_classes <= 40"))
    train_repetitions: int = param(4, ge=1, le=80, doc="things-eeg: repetitions of each training image (real: 4)")
    test_repetitions: int = param(8, ge=1, le=80, doc="things-eeg: repetitions of each test image (real: 80; "
                                                      "scaled down by default)")
    eeg_code: Literal["sources", "bandpower", "erp"] = param("sources", doc=(
        "how the EEG carries class and instance: sources (phase-locked oscillatory sources whose amplitudes encode "
        "them), bandpower (induced narrow-band power, random phase per trial, in localised channel groups), erp "
        "(time-locked low-frequency components whose latencies and amplitudes encode them)"))
    images: Literal["objects", "glyphs", "cluttered"] = param("objects", doc=(
        "stimulus family: objects (class = shape x colour on a textured background), glyphs (class = fill pattern x "
        "hue inside a rounded panel), cluttered (objects among random distractor shapes)"))

    def validate(self, prefix: str) -> None:
        if self.layout is not None:
            if self.format != "things-eeg":
                raise ConfigError(f"{prefix}.layout: only for format things-eeg, got format {self.format}")
            shape = tuple(int(v) for v in self.layout.split("x"))
            defaults = (SynthConfig.channels, SynthConfig.times)
            if (self.channels, self.times) not in (shape, defaults):
                raise ConfigError(f"{prefix}.layout: {self.layout} fixes channels x times, but {prefix}.channels x "
                                  f"{prefix}.times is {self.channels} x {self.times}; set one of them, not both")
        if self.format == "things-eeg" and self.classes + self.test_classes > 40:
            raise ConfigError(f"{prefix}.test_classes: expected classes + test_classes <= 40 (the twin has 40 distinct "
                              f"class looks), got {self.classes} + {self.test_classes}")

    def shape(self) -> tuple[int, int]:
        """(channels, samples) of a things-eeg segment: the layout's, else synth.channels x synth.times."""
        if self.layout is not None:
            c, t = self.layout.split("x")
            return int(c), int(t)
        return self.channels, self.times


ENCODER_NAMES = ("lstm", "channelnet", "tsconv")  # kept equal to neuroimagen.models.eeg_encoders.ENCODERS (tested)
# braindecode models usable as encoders, `braindecode:<Model>` (neuroimagen.models.braindecode_encoders); EEGNetv4 is
# EEGNet's name before braindecode 1.0
BRAINDECODE_ENCODERS = ("EEGNet", "EEGNetv4", "ShallowFBCSPNet", "Deep4Net", "EEGConformer", "ATCNet")
EncoderName = str  # one of ENCODER_NAMES or 'braindecode:<one of BRAINDECODE_ENCODERS>' (check_encoder_name)


def check_stage_encoder(encoder: Optional[str], width: Optional[int], prefix: str) -> None:
    """A later stage's own ``encoder`` / ``width`` (null = stage 1's): a registry name, and no width for a braindecode
    model (it keeps its published sizes)."""
    if encoder is not None:
        check_encoder_name(encoder, f"{prefix}.encoder")
        if encoder.startswith("braindecode:") and width is not None:
            raise ConfigError(f"{prefix}.width: {encoder} keeps its published sizes; expected null, got {width}")


def check_encoder_name(name: str, dotted: str) -> None:
    """One line naming the key when ``name`` is neither one of ours nor a supported braindecode model."""
    if name in ENCODER_NAMES:
        return
    if name.startswith("braindecode:"):
        model = name.split(":", 1)[1]
        if model in BRAINDECODE_ENCODERS:
            return
        close = difflib.get_close_matches(model, BRAINDECODE_ENCODERS, n=1, cutoff=0.5)
        hint = f" (did you mean 'braindecode:{close[0]}'?)" if close else ""
        raise ConfigError(f"{dotted}: unknown braindecode model '{model}'{hint}; supported: "
                          f"{', '.join(BRAINDECODE_ENCODERS)}")
    close = difflib.get_close_matches(name, ENCODER_NAMES, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"{dotted}: unknown encoder {name!r}{hint}; expected one of {', '.join(ENCODER_NAMES)} or "
                      f"braindecode:<Model> with Model one of {', '.join(BRAINDECODE_ENCODERS)}")
DIFFAUGMENT_POLICIES = ("color", "translation", "cutout")  # kept equal to neuroimagen.augment.POLICIES (tested)


@dataclass(frozen=True)
class EncoderStageConfig(Checked):
    """Stage 1: EEG encoder f_theta trained with the triplet loss (eq. 1)."""

    name: EncoderName = param("tsconv", doc="encoder from the registry: lstm (Spampinato 2017), channelnet (Palazzo 2020), tsconv (NICE), or braindecode:<Model> (EEGNet, ShallowFBCSPNet, Deep4Net, EEGConformer, ATCNet; the braindecode extra)")
    embed_dim: int = param(128, ge=2, doc="feature size D of f_theta(x)")
    width: Optional[int] = param(None, ge=1, doc="encoder size (LSTM hidden, conv filters); null = the encoder's default")
    dropout: float = param(0.25, ge=0, lt=1, doc="dropout inside the encoder")
    # On raw features a fixed margin is met by inflating their norms (every gap scales with them), so the
    # triplet loss measures it on unit-norm embeddings by default (triplet_normalize); the features handed to
    # the saliency GAN stay raw unless l2_normalize (unit-norm features conditioned G worse on the twin: quick
    # demo pixel correlation 0.36 vs 0.54, I ACC 26 % vs 32 %).
    triplet_normalize: bool = param(True, doc="measure the triplet margin on L2-normalised embeddings; false: on raw "
                                              "features, margin in their units (the old behaviour)")
    l2_normalize: bool = param(False, doc="L2-normalise the features f_theta(x) themselves (as in EEGStyleGAN-ADA): "
                                          "G is then conditioned on unit-norm features")
    # 0.2 is FaceNet's margin for squared distances between unit-norm embeddings: those lie in [0, 4]
    # ([0, 2] after the encoders' final ReLU, 2 = orthogonal), so 0.2 is a tenth of the orthogonal gap.
    margin: float = param(0.2, ge=0, doc="triplet margin beta (eq. 1), in units of d: squared distance on the unit "
                                         "sphere when triplet_normalize and squared (d in [0, 4])")
    mining: Literal["batch_all", "semi_hard", "batch_hard"] = param("semi_hard", doc="triplet mining strategy")
    squared: bool = param(True, doc="squared Euclidean distances in the triplet loss (eq. 1)")
    epochs: int = param(30, ge=1, doc="training epochs")
    classes_per_batch: int = param(8, ge=2, doc="P: classes per worker in each class-balanced batch (the global "
                                                "batch holds min(P x workers, classes) distinct classes)")
    samples_per_class: int = param(4, ge=2, doc="K: samples per class in each batch (batch = P x K); a class with "
                                                "fewer gives all it has, no sample twice")
    lr: float = param(1e-3, gt=0, doc="Adam learning rate")
    weight_decay: float = param(1e-4, ge=0, doc="Adam weight decay")
    val_every: int = param(1, ge=1, doc="validate every N epochs (and after the last)")
    knn_k: int = param(5, ge=1, doc="neighbours of the k-NN validation classifier")

    def validate(self, prefix: str) -> None:
        check_encoder_name(self.name, f"{prefix}.name")
        if self.name.startswith("braindecode:") and self.width is not None:
            raise ConfigError(f"{prefix}.width: {self.name} keeps its published sizes; expected null, got {self.width}")


@dataclass(frozen=True)
class SaliencyStageConfig(Checked):
    """Stage 2: conditional saliency GAN G(z, f_theta(x)) (eq. 2-6), f_theta frozen from stage 1.

    Generator loss (eq. 6): alpha2 * hinge adversarial + alpha1 * mode seeking + alpha3 * (1 - SSIM).
    """

    resolution: Literal[32, 64, 128] = param(64, doc="saliency map size in pixels (paper: 64)")
    z_dim: int = param(128, ge=1, doc="noise size, z ~ U(-1, 1)")
    g_width: int = param(64, ge=4, doc="generator base width")
    d_width: int = param(64, ge=4, doc="discriminator base width")
    # The paper does not report its alpha values; these defaults favour reconstruction (SSIM) and keep
    # the adversarial and mode-seeking terms as regularisers. Sweep them with tune_spaces/gan.yaml.
    alpha1: float = param(0.01, ge=0, doc="weight of the mode-seeking term (eq. 4)")
    alpha2: float = param(0.1, ge=0, doc="weight of the hinge adversarial term (eq. 3)")
    alpha3: float = param(1.0, ge=0, doc="weight of the 1 - SSIM term (eq. 5)")
    diffaugment: str = param("color,translation,cutout", doc="DiffAugment policy applied to real and fake before D")
    lr: float = param(3e-4, gt=0, doc="Adam learning rate of G and D")
    betas: tuple[float, float] = param((0.2, 0.5), doc="Adam betas (EEG2Image)")
    epochs: int = param(30, ge=1, doc="training epochs")
    batch_size: int = param(32, ge=2, doc="batch size per worker")
    val_every: int = param(1, ge=1, doc="validate every N epochs (and after the last)")
    val_samples: int = param(4, ge=2, doc="validation: images of G per item (one fixed z each) for val_diversity")
    # val_objective = val_ssim + objective_diversity * val_diversity - objective_kid * k / (k + val_kid_mean_image):
    # the defaults keep pure noise (diversity 1/3, penalty -> 1) below the mean training image (penalty 1/2)
    objective_diversity: float = param(0.5, ge=0, doc="val_objective: weight of val_diversity (mean pairwise |G(z1) - G(z2)| in [0, 1] pixels)")
    objective_kid: float = param(0.25, ge=0, doc="val_objective: weight of the realism penalty k / (k + val_kid_mean_image), k = max(val_kid, 0) on the embedded random-conv features")
    image_every: int = param(10, ge=0, doc="TensorBoard (train.tensorboard): a grid of saliency samples (validation images, then G for val_samples fixed z) every N epochs and after the last; 0 = none")

    def validate(self, prefix: str) -> None:
        bad = [p for p in self.diffaugment.split(",") if p.strip() and p.strip() not in DIFFAUGMENT_POLICIES]
        if bad:
            raise ConfigError(f"{prefix}.diffaugment: unknown policy '{bad[0]}' (known: {', '.join(DIFFAUGMENT_POLICIES)})")


@dataclass(frozen=True)
class SemanticStageConfig(Checked):
    """Stage 3: EEG -> caption embedding regressor h (eq. 7), loss ||h - h_caption||^2.

    Two regressors share these settings: stage ``semantic`` regresses label captions ('An image of
    <name>', the paper's L) and stage ``semantic_image`` per-image captions (data.captions, the paper's B).
    """

    encoder: Optional[EncoderName] = param(None, doc="EEG encoder of the regressor; null = stages.encoder.name")
    width: Optional[int] = param(None, ge=1, doc="encoder size; null = the encoder's default")
    embed_dim: int = param(128, ge=2, doc="encoder feature size before the regression head")
    hidden: int = param(256, ge=1, doc="hidden units of the regression head")
    dropout: float = param(0.25, ge=0, lt=1, doc="dropout inside the encoder and head")
    init_from_encoder: bool = param(True, doc="start from the stage-1 encoder weights when the architecture matches")
    epochs: int = param(30, ge=1, doc="training epochs")
    batch_size: int = param(32, ge=2, doc="batch size per worker")
    lr: float = param(1e-3, gt=0, doc="Adam learning rate")
    weight_decay: float = param(1e-4, ge=0, doc="Adam weight decay")
    val_every: int = param(1, ge=1, doc="validate every N epochs (and after the last)")

    def validate(self, prefix: str) -> None:
        check_stage_encoder(self.encoder, self.width, prefix)


@dataclass(frozen=True)
class ClipImageStageConfig(Checked):
    """Optional stage ``clip_image``: an EEG encoder + projection aligned to the frozen CLIP image embeddings of the
    stimuli with a symmetric InfoNCE loss and a learnable temperature (NICE / ATM); scored by ``neuroimagen
    retrieval`` against the CLIP image embeddings of the test images."""

    enabled: bool = param(False, doc="train this stage in `neuroimagen train` / ablation / loso folds (an explicit "
                                     "--stages clip_image trains it regardless)")
    clip_vision: Optional[str] = param(None, doc=(
        "local folder of a CLIP vision model in the transformers layout (CLIPVisionModelWithProjection or CLIPModel, "
        "e.g. a copy of openai/clip-vit-large-patch14; absolute, or relative to the working directory); null or 'tiny' = a tiny in-code CLIP vision model (seeded, "
        "for tests and the demo); nothing is downloaded"))
    tiny_dim: int = param(64, ge=8, doc="tiny CLIP vision model: width and image-embedding size")
    encoder: Optional[EncoderName] = param(None, doc="EEG encoder; null = stages.encoder.name")
    width: Optional[int] = param(None, ge=1, doc="encoder size; null = the encoder's default")
    embed_dim: int = param(128, ge=2, doc="encoder feature size before the projection to the CLIP space")
    dropout: float = param(0.25, ge=0, lt=1, doc="dropout inside the encoder and the projection")
    init_from_encoder: bool = param(True, doc="start from the stage-1 encoder weights when the architecture matches")
    center_targets: bool = param(True, doc="subtract the training images' mean CLIP embedding from every image "
                                           "embedding (training and retrieval) before the cosine")
    temperature: float = param(0.07, ge=0.01, le=1, doc="initial softmax temperature T (logit scale 1/T, learnable, "
                                                        "clamped to [1, 100] as CLIP)")
    learn_temperature: bool = param(True, doc="learn the temperature; false: keep it at stages.clip_image.temperature")
    epochs: int = param(30, ge=1, doc="training epochs")
    batch_size: int = param(64, ge=2, doc="batch size per worker (rows of distinct images: no image twice in a "
                                          "global batch)")
    lr: float = param(3e-4, gt=0, doc="AdamW learning rate")
    weight_decay: float = param(1e-4, ge=0, doc="AdamW weight decay")
    val_every: int = param(1, ge=1, doc="validate every N epochs (and after the last)")

    def validate(self, prefix: str) -> None:
        check_stage_encoder(self.encoder, self.width, prefix)
        if self.clip_vision is not None and self.clip_vision != "tiny":
            if "://" in self.clip_vision or not self.clip_vision.strip():
                raise ConfigError(f"{prefix}.clip_vision: expected a local folder or 'tiny', got {self.clip_vision!r} "
                                  "(nothing is downloaded)")
            if self.enabled and not Path(os.path.expanduser(self.clip_vision)).is_dir():
                raise ConfigError(f"{prefix}.clip_vision: {self.clip_vision}: no such directory (expected a local "
                                  "CLIP vision model folder, or 'tiny')")


@dataclass(frozen=True)
class StagesConfig(Checked):
    encoder: EncoderStageConfig = param(default_factory=EncoderStageConfig)
    saliency: SaliencyStageConfig = param(default_factory=SaliencyStageConfig)
    semantic: SemanticStageConfig = param(default_factory=SemanticStageConfig)
    clip_image: ClipImageStageConfig = param(default_factory=ClipImageStageConfig)


@dataclass(frozen=True)
class TextEncoderConfig(Checked):
    """The CLIP text encoder that defines caption embeddings (stage-3 targets, LDM conditioning)."""

    pretrained: Optional[str] = param(None, doc="local Stable Diffusion snapshot / CLIP folder, or a model id in the local HF cache; null = tiny in-code encoder")
    hidden_size: int = param(32, ge=8, doc="tiny encoder: width E")
    num_layers: int = param(2, ge=1, doc="tiny encoder: transformer layers")
    num_heads: int = param(2, ge=1, doc="tiny encoder: attention heads")
    max_length: int = param(64, ge=8, le=512, doc="tiny encoder: tokens L (character-level tokenizer)")


@dataclass(frozen=True)
class LDMConfig(Checked):
    """Stage 4: the frozen latent diffusion model and its img2img call (NeuroImagen sec. 3.4)."""

    pretrained: Optional[str] = param(None, doc="local Stable Diffusion snapshot directory or a model id in the local HF cache; null = a tiny LDM trained on the training images")
    strength: float = param(0.75, gt=0, le=1, doc="img2img strength: how far the saliency map is noised before denoising")
    guidance_scale: float = param(5.0, ge=1, doc="classifier-free guidance scale (1 = off)")
    num_inference_steps: int = param(20, ge=1, doc="DDIM steps (img2img runs strength x steps of them)")
    samples_per_eeg: int = param(3, ge=1, doc="generated images per EEG trial (paper: 3)")
    dtype: Literal["float32", "float16", "bfloat16"] = param("float32", doc="pipeline dtype (half precision only on GPUs)")
    attention_slicing: bool = param(False, doc="enable_attention_slicing() to save GPU memory (sliced attention replaces ldm.attention)")
    attention: Literal["sdpa", "eager"] = param("sdpa", doc="attention of the UNet and VAE: sdpa = torch scaled_dot_product_attention (fused kernels on GPUs); eager = explicit matmul + softmax")
    resolution: int = param(32, ge=8, doc="tiny LDM: image size (pretrained: the snapshot's own)")
    vae_channels: tuple[int, ...] = param((16, 32), doc="tiny LDM: VAE block widths (one halving per extra block)")
    unet_channels: tuple[int, ...] = param((32, 64), doc="tiny LDM: UNet block widths")
    vae_steps: int = param(300, ge=1, doc="tiny LDM: VAE training steps")
    unet_steps: int = param(800, ge=1, doc="tiny LDM: UNet training steps")
    train_batch_size: int = param(32, ge=1, doc="tiny LDM: training batch size")
    lr: float = param(1e-3, gt=0, doc="tiny LDM: AdamW learning rate (cosine schedule)")
    cond_dropout: float = param(0.1, ge=0, lt=1, doc="tiny LDM: fraction of training captions replaced by the empty caption")
    seed: int = param(0, ge=0, doc="tiny LDM: training seed")

    def validate(self, prefix: str) -> None:
        if len(self.vae_channels) < 2 or len(self.unet_channels) < 2:
            raise ConfigError(f"{prefix}.vae_channels/unet_channels: expected at least 2 widths each")
        if self.resolution % (2 ** (len(self.vae_channels) - 1) * 2 ** (len(self.unet_channels) - 1)):
            raise ConfigError(f"{prefix}.resolution: {self.resolution} must be divisible by the VAE and UNet downsampling "
                              f"({2 ** (len(self.vae_channels) - 1)} x {2 ** (len(self.unet_channels) - 1)})")


@dataclass(frozen=True)
class VariantConfig(Checked):
    """One reconstruction variant: where the init image and the prompt embedding come from."""

    name: str = param("L+I", doc="name in results (paper Table 3: I, L, B, B+I, L+I)")
    init: Literal["saliency", "noise", "gt"] = param("saliency", doc="saliency: G(z, f(x)) upsampled, img2img; noise: text-to-image; gt: the ground-truth image reduced to the saliency resolution")
    semantics: Literal["none", "label", "image", "true_label", "true_image"] = param(
        "label", doc="prompt embedding: none (empty caption), label/image (the stage-3 regressor on label/per-image captions), true_*: the true caption's embedding")
    eeg: Literal["own", "other_class"] = param("own", doc="own: the trial's EEG; other_class: the EEG of a random trial of another class of the same subject (a control, not chance: chance is k/N)")
    description: str = param("", doc="one line for the report")


DEFAULT_VARIANTS = (
    VariantConfig("I", "saliency", "none", "own", "saliency map only (empty prompt)"),
    VariantConfig("L", "noise", "label", "own", "label-caption semantics, from pure noise"),
    VariantConfig("B", "noise", "image", "own", "per-image-caption semantics, from pure noise"),
    VariantConfig("B+I", "saliency", "image", "own", "per-image-caption semantics + saliency map"),
    VariantConfig("L+I", "saliency", "label", "own", "label-caption semantics + saliency map (NeuroImagen)"),
    VariantConfig("oracle", "gt", "true_label", "own", "true label-caption embedding + GT image at saliency resolution"),
    VariantConfig("other-class", "saliency", "label", "other_class",
                  "control: variant L+I fed the EEG of a random trial of another class (chance is k/N)"),
)
# default variants renamed since: an old name in eval.variants is one error naming the new one
RENAMED_VARIANTS = {"chance": "other-class"}


SuiteNetwork = Literal["alexnet", "inception", "clip", "effnet", "swav"]


@dataclass(frozen=True)
class SuiteConfig(Checked):
    """The field's reconstruction suite (MindEye / ATM) scored beside ACC, IS and SSIM, and its statistics.

    Every feature network loads from a local file (nothing is downloaded); an unset one is left out and the
    report says so. Without any of them the embedded default still scores PixCorr, two-way identification and
    FID/KID on the judge CNN's pooled features, each labelled as such."""

    alexnet: Optional[str] = param(None, path=True, doc="torchvision alexnet state dict (IMAGENET1K_V1): AlexNet(2) and AlexNet(5) two-way identification")
    inception: Optional[str] = param(None, path=True, doc="torchvision inception_v3 state dict (IMAGENET1K_V1): Inception-v3 two-way identification (avgpool)")
    clip: Optional[str] = param(None, path=True, doc="local transformers folder of CLIP ViT-L/14 (CLIPVisionModelWithProjection or CLIPModel): CLIP two-way identification")
    effnet: Optional[str] = param(None, path=True, doc="torchvision efficientnet_b1 state dict: EfficientNet-B1 correlation distance")
    swav: Optional[str] = param(None, path=True, doc="SwAV ResNet-50 weights (swav_800ep_pretrain.pth.tar or a torchvision resnet50 state dict): SwAV correlation distance")
    judge_features: bool = param(True, doc="also score two-way identification on the judge CNN's pooled features (labelled: not a published network); only with the judge classifier")
    fid_network: Literal["judge", "inception"] = param("judge", doc="features of FID and KID: judge = the judge CNN's pooled features (labelled, comparable only within this project); inception = Inception-v3 avgpool from eval.suite.inception (torchvision weights, not the TF-FID Inception: labelled)")
    kid_subsets: int = param(100, ge=1, doc="KID: random subsets per group (torch-fidelity's kid_subsets)")
    kid_subset_size: int = param(1000, ge=2, doc="KID: rows per subset (torch-fidelity's kid_subset_size), clamped to the group's smaller set (recorded)")
    bootstrap: int = param(2000, ge=10, doc="bootstrap replicates of the 95 % CI of every per-image metric (resampling test trials, seeded)")
    bootstrap_whole_set: int = param(200, ge=10, doc="bootstrap replicates of the CI of whole-set metrics (IS, FID): each replicate recomputes the metric")
    ci_level: float = param(0.95, gt=0, lt=1, doc="confidence level of the bootstrap intervals")
    permutations: int = param(10000, ge=100, doc="paired sign-flip permutations per variant comparison (exact enumeration when 2^trials is smaller)")
    comparisons: tuple[str, ...] = param(("L+I:I", "L+I:L"), doc="variant pairs 'A:B' tested per metric with a paired permutation test over test trials (pairs with a variant not run are skipped)")

    def validate(self, prefix: str) -> None:
        for c in self.comparisons:
            a, sep, b = c.partition(":")
            if not sep or not a or not b or a == b:
                raise ConfigError(f"{prefix}.comparisons: '{c}' is not a pair of two variants 'A:B'")
        if self.fid_network == "inception" and self.inception is None:
            raise ConfigError(f"{prefix}.fid_network: inception needs {prefix}.inception (a local torchvision "
                              f"inception_v3 state dict)")


@dataclass(frozen=True)
class EvalConfig(Checked):
    """Reconstruction and scoring of the test split (DESIGN sec. 3): ACC, IS, SSIM per subject and variant."""

    split: Literal["test", "val"] = param("test", doc="split reconstructed and scored")
    variants: tuple[str, ...] = param(("I", "L", "B", "B+I", "L+I", "oracle", "other-class"), doc="variants to run (names from eval.definitions)")
    definitions: tuple[VariantConfig, ...] = param(DEFAULT_VARIANTS, doc="variant definitions (data, not code)")
    subjects: Optional[tuple[int, ...]] = param(None, doc="subjects to reconstruct; null = all in the split")
    max_trials: Optional[int] = param(None, ge=1, doc="cap on EEG trials per subject (first by dataset order); null = all")
    classifier: Optional[str] = param(None, doc="torchvision architecture of the evaluation classifier (e.g. vit_h_14); null = the judge CNN trained on the training images")
    classifier_weights: Optional[str] = param(None, path=True, doc="local state-dict file of eval.classifier")
    classifier_image_size: Optional[int] = param(None, ge=32, doc="input size for ViT classifiers (SWAG ViT-H/14: 518)")
    classifier_classes: Optional[str] = param(None, path=True, doc="class-index file of eval.classifier (imagenet_class_index.json layout {\"0\": [\"n01440764\", \"tench\"], ...}, or one WNID per line in class-index order): puts the dataset's WNIDs in the classifier's label space for its top-1 accuracy on the GT images; null with a torchvision classifier = that accuracy is reported as not available (the judge is trained on the dataset's labels: identity)")
    is_network: Literal["classifier", "inception_v3"] = param("classifier", doc="network of the Inception Score: classifier = the ACC classifier's probabilities (the judge CNN by default; labelled as not Inception-v3); inception_v3 = torchvision Inception-v3 from eval.is_weights at 299 px with its weights' preprocessing, scored beside the ACC classifier")
    is_weights: Optional[str] = param(None, path=True, doc="local state dict of eval.is_network: inception_v3 (torchvision Inception_V3_Weights.IMAGENET1K_V1 layout, 1000 classes); nothing is downloaded")
    judge_steps: int = param(300, ge=1, doc="judge CNN training steps")
    judge_width: int = param(16, ge=4, doc="judge CNN base width")
    n_way: int = param(50, ge=2, doc="N of N-way top-k accuracy (clamped to the classifier's classes, with a warning)")
    top_k: int = param(1, ge=1, doc="k of N-way top-k accuracy")
    trials: int = param(50, ge=1, doc="distractor draws per image")
    is_splits: int = param(10, ge=1, doc="most Inception Score splits: a group of N images uses clamp(N // 50, 1, is_splits) splits (at least 50 images each; one split below 100 images), after a permutation seeded by seed")
    ssim_convention: Literal["dreamdiffusion", "mindeye"] = param("dreamdiffusion", doc="SSIM protocol (DESIGN sec. 3)")
    ssim_resolution: Optional[int] = param(None, ge=7, doc="resize both images to this size before SSIM; null = the LDM's resolution (mindeye: 425)")
    backend: Literal["ray", "local"] = param("ray", doc="ray: Ray Data actors; local: the same callables in a loop in this process")
    actors: int = param(1, ge=1, doc="generation actors (Ray Data), one CPU and one torch thread each")
    pipeline: Literal["fused", "staged"] = param("fused", doc="Ray Data layout: fused = decode -> generate -> score inside each of eval.actors actors (no object-store hops, no actors competing for the same cores; measured faster on CPUs); staged = three actor pools (decode, eval.actors generators, one scorer)")
    batch_size: int = param(16, ge=1, doc="rows per batch through decode -> generate -> score")
    use_gpu: bool = param(False, doc="one GPU per generation actor")
    fault_injection_batch: Optional[int] = param(None, ge=0, doc="testing: a generation actor kills itself (SIGKILL) once, on its Nth batch (from 0), to exercise Ray Data's retries")
    fault_injection_shard: Optional[int] = param(None, ge=0, doc="testing: the driver kills itself (SIGKILL) once, halfway through writing its Nth shard (from 0)")
    suite: SuiteConfig = param(default_factory=SuiteConfig)
    protocol: Literal["within", "loso"] = param("within", doc=(
        "within: train and test on every subject; loso: also leave each subject out in turn (RUN/loso/sub-XX/: "
        "every stage trained on the other subjects, tested on that one) and write results/summary_loso.csv"))

    def validate(self, prefix: str) -> None:
        names = [d.name for d in self.definitions]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"{prefix}.definitions: variant '{dup[0]}' is defined twice")
        for v in self.variants:
            if v in RENAMED_VARIANTS and v not in names:
                raise ConfigError(f"{prefix}.variants: variant '{v}' was renamed '{RENAMED_VARIANTS[v]}' (the EEG of "
                                  f"another class's trial: a control; chance is k/N)")
            if v not in names:
                raise ConfigError(f"{prefix}.variants: unknown variant '{v}' (defined: {', '.join(names)})")
        if (self.classifier is None) != (self.classifier_weights is None):
            raise ConfigError(f"{prefix}.classifier_weights: set eval.classifier and eval.classifier_weights together "
                              f"(got classifier={self.classifier!r}, classifier_weights={self.classifier_weights!r})")
        if self.classifier_classes is not None and self.classifier is None:
            raise ConfigError(f"{prefix}.classifier_classes: only for a torchvision eval.classifier (the judge CNN is "
                              f"trained on the dataset's own labels); set eval.classifier or drop classifier_classes")
        if (self.is_network == "inception_v3") != (self.is_weights is not None):
            raise ConfigError(f"{prefix}.is_weights: eval.is_network: inception_v3 needs eval.is_weights (a local "
                              f"state dict) and is_weights needs it (got is_network={self.is_network!r}, "
                              f"is_weights={self.is_weights!r})")

    def variant(self, name: str) -> VariantConfig:
        return next(d for d in self.definitions if d.name == name)


@dataclass(frozen=True)
class TrainConfig(Checked):
    """How stages run: in this process, or on Ray Train with DDP."""

    backend: Literal["ray", "local"] = param("ray", doc="ray: TorchTrainer with DDP; local: the same fit() in this process")
    num_workers: int = param(1, ge=1, doc="Ray Train workers (DDP ranks)")
    use_gpu: bool = param(False, doc="one GPU per worker (nccl); false = CPU (gloo)")
    cpus_per_worker: float = param(1.0, gt=0, doc="CPUs reserved per worker")
    threads_per_worker: int = param(0, ge=0, doc="torch threads per worker; 0 = cpus_per_worker")
    max_failures: int = param(2, ge=0, doc="worker-group restarts before a stage fails (resumes from the last checkpoint)")
    storage_path: Optional[str] = param(None, path=True, doc="Ray Train storage (must be shared storage on a multi-node cluster); null = <run>/ray")
    ray_address: Optional[str] = param(None, doc="Ray cluster to join; null = RAY_ADDRESS, else start a local instance")
    ray_num_cpus: Optional[int] = param(None, ge=1, doc="logical CPUs of a local Ray instance; null = max(4, cores)")
    checkpoints_to_keep: int = param(2, ge=1, doc="checkpoints kept per stage")
    fault_injection_epoch: Optional[int] = param(None, ge=0, doc="testing: kill rank 0 once during this epoch to exercise recovery")
    progress: bool = param(True, doc="print one line per epoch")
    tensorboard: bool = param(True, doc="TensorBoard event files (tensorboardX): every epoch's metrics of a stage in <run>/tensorboard/<stage> (rank 0 writes), saliency sample grids; a sweep also logs every trial in <out>/sweep/<trial>/ (Ray Tune's TBXLoggerCallback)")
    mlflow: bool = param(False, doc="sweeps: also log every trial (parameters, per-epoch metrics) to MLflow with Ray Tune's MLflowLoggerCallback (needs mlflow: pip install mlflow-skinny; without it one line says it is off)")
    mlflow_tracking_uri: Optional[str] = param(None, doc="MLflow tracking URI of train.mlflow; null = MLFLOW_TRACKING_URI if set, else the file store <sweep out>/mlruns")
    precision: Literal["fp32", "bf16"] = param("fp32", doc="training compute: bf16 = torch.autocast(bfloat16) around forward passes (fast on Ampere+ GPUs; correct but usually slower on CPUs; on a CPU without a bf16 LSTM kernel, e.g. AVX2-only, LSTM layers run in fp32); weights, optimiser, losses and validation stay fp32")
    channels_last: bool = param(False, doc="channels_last memory format for the image models (saliency G, D) and their batches (faster convolutions on tensor-core GPUs)")
    compile: bool = param(False, doc="torch.compile the trained modules (the first steps pay the compile time; needs a C++ compiler on CPU)")


@dataclass(frozen=True)
class Config(Checked):
    """The whole configuration of a neuroimagen run."""

    seed: int = param(0, ge=0, doc="global seed")
    data: DataConfig = param(default_factory=DataConfig)
    synth: SynthConfig = param(default_factory=SynthConfig)
    stages: StagesConfig = param(default_factory=StagesConfig)
    text_encoder: TextEncoderConfig = param(default_factory=TextEncoderConfig)
    train: TrainConfig = param(default_factory=TrainConfig)
    ldm: LDMConfig = param(default_factory=LDMConfig)
    eval: EvalConfig = param(default_factory=EvalConfig)

    def validate(self, prefix: str) -> None:  # noqa: ARG002 - uniform signature
        if self.eval.split != "test" and (self.data.holdout_subject is not None or self.eval.protocol == "loso"):
            raise ConfigError(f"eval.split: '{self.eval.split}' with leave-one-subject-out (eval.protocol: "
                              f"{self.eval.protocol}, data.holdout_subject: {self.data.holdout_subject}); a held-out "
                              "subject has only test trials, and validation is the training subjects' (use test)")
        if self.ldm.pretrained is not None and self.text_encoder.pretrained is None:
            raise ConfigError("text_encoder.pretrained: null, but ldm.pretrained is set; stage-3 targets must come from the "
                              "diffusion model's own text encoder (set text_encoder.pretrained to the same snapshot)")


# ---------------------------------------------------------------------------------------------
# Conversion with dotted-path errors


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _bounds(meta: dict) -> str:
    parts = []
    for key, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if meta.get(key) is not None:
            parts.append(f"{sym} {meta[key]}")
    return (" " + " and ".join(parts)) if parts else ""


def _describe(tp: Any, meta: dict) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _describe(inner[0], meta) + " or null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0], {})}s"
        return f"a list of {len(args)} {_describe(args[0], {})}s"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "integer" + _bounds(meta)
    if tp is float:
        return "float" + _bounds(meta)
    if tp is str:
        return "string"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _check_bounds(value, meta: dict) -> bool:
    if meta.get("ge") is not None and not value >= meta["ge"]:
        return False
    if meta.get("gt") is not None and not value > meta["gt"]:
        return False
    if meta.get("le") is not None and not value <= meta["le"]:
        return False
    if meta.get("lt") is not None and not value < meta["lt"]:
        return False
    return True


def _fail(dotted: str, tp: Any, meta: dict, value: Any) -> ConfigError:
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    if isinstance(value, int) and not isinstance(value, bool) and not INT64[0] <= value <= INT64[1]:
        shown = f"an integer of {value.bit_length()} bits (at most 64 fit)"
    return ConfigError(f"{dotted}: expected {_describe(tp, meta)}, got {shown}")


def _convert(value: Any, tp: Any, meta: dict, dotted: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if meta.get("path") and isinstance(value, str) and "\x00" in value:
        raise ConfigError(f"{dotted}: expected a path without NUL characters, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        try:
            return _convert(value, inner[0], meta, dotted)
        except ConfigError:
            raise _fail(dotted, tp, meta, value) from None
    if origin is Literal:
        if value in args and isinstance(value, str) == isinstance(args[0], str):
            return value
        raise _fail(dotted, tp, meta, value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _fail(dotted, tp, meta, value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], {}, f"{dotted}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _fail(dotted, tp, meta, value)
        return tuple(_convert(v, a, {}, f"{dotted}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(dotted, tp, meta, value)
        return from_dict(tp, value, dotted)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(dotted, tp, meta, value)
    if tp is int:
        if (isinstance(value, int) and not isinstance(value, bool) and INT64[0] <= value <= INT64[1]
                and _check_bounds(value, meta)):
            return value
        raise _fail(dotted, tp, meta, value)
    if tp is float:
        out = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            with contextlib.suppress(OverflowError):  # an int beyond the float range
                out = float(value)
        elif isinstance(value, str):
            # PyYAML reads '1e-3' (no dot) as a string: accept any numeric string for a float field.
            try:
                out = float(value.strip())
            except ValueError:
                out = None
        if out is not None and math.isfinite(out) and _check_bounds(out, meta):
            return out
        raise _fail(dotted, tp, meta, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(dotted, tp, meta, value)
    raise ConfigError(f"{dotted}: unsupported config type {tp!r}")  # a programming error, named anyway


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls, data: dict, prefix: str = ""):
    """Build the frozen dataclass ``cls`` from a plain dict; unknown keys and bad values raise."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<top level>'}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if not isinstance(key, str) or key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
            shown = key if isinstance(key, str) and key.isidentifier() else repr(key)  # '', 'a b', 1, None
            raise ConfigError(f"{_join(prefix, shown)}: unknown key{hint}")
    kwargs = {}
    for name, f in known.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], dict(f.metadata), _join(prefix, name))
    _BUILDING.depth = getattr(_BUILDING, "depth", 0) + 1
    try:
        obj = cls(**kwargs)
    finally:
        _BUILDING.depth -= 1
    if hasattr(obj, "validate"):
        obj.validate(prefix or cls.__name__.lower())
    return obj


def to_dict(obj) -> dict:
    """Plain-data view of a config (tuples become lists) suitable for YAML/JSON."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(obj)


# ---------------------------------------------------------------------------------------------
# Paths


def _resolve_paths(cls, data: dict, base: Path) -> dict:
    """Return ``data`` with relative path fields made absolute against ``base``."""
    if not isinstance(data, dict):
        return data
    hints = _hints(cls)
    out = dict(data)
    for f in dataclasses.fields(cls):
        if f.name not in out:
            continue
        v = out[f.name]
        if f.metadata.get("path") and isinstance(v, str) and v and "\x00" not in v:  # NUL: refused by from_dict
            p = Path(os.path.expanduser(v))
            out[f.name] = str(p if p.is_absolute() else (base / p).resolve())
        elif dataclasses.is_dataclass(hints[f.name]) and isinstance(v, dict):
            out[f.name] = _resolve_paths(hints[f.name], v, base)
    return out


# ---------------------------------------------------------------------------------------------
# YAML loading and --set overrides


def _yaml():
    import yaml  # noqa: PLC0415 - `neuroimagen --help` and `import neuroimagen.config` stay free of YAML

    return yaml


# Besides YAMLError, PyYAML's constructors raise these for well-formed but impossible scalars
# ('2024-13-45', '!!int abc', a 5000-digit integer) and its composer recurses once per nesting level.
YAML_CONSTRUCT_ERRORS = (ValueError, TypeError, OverflowError, RecursionError)


def read_yaml_mapping(path: str | os.PathLike, what: str = "config") -> dict:
    """Read a YAML file that must hold a mapping; any problem is one ConfigError naming the file."""
    yaml = _yaml()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {what} file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read {what} file ({exc.__class__.__name__}: {exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)[:200] or exc.__class__.__name__
        raise ConfigError(f"{p}: invalid YAML{where}: {problem}") from None
    except YAML_CONSTRUCT_ERRORS as exc:
        raise ConfigError(f"{p}: invalid YAML: {exc.__class__.__name__}: {str(exc)[:200]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def _field_type(cls, dotted: str, source: str):
    """Walk ``dotted`` through the dataclass tree; return (type, metadata) of the leaf."""
    parts = dotted.split(".")
    tp, meta = cls, {}
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{source}: {'.'.join(parts[:i])} is not a section (it has no key '{part}')")
        known = {f.name: f for f in dataclasses.fields(tp)}
        if part not in known:
            close = difflib.get_close_matches(part, list(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
            raise ConfigError(f"{source}: {'.'.join(parts[: i + 1])}: unknown key{hint}")
        meta = dict(known[part].metadata)
        tp = _hints(tp)[part]
    return tp, meta


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value``; the value is parsed as YAML (``3``, ``true``, ``[1, 2]``, ``null``)."""
    yaml = _yaml()
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {text}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, *YAML_CONSTRUCT_ERRORS):
        value = raw
    return key, value


def _set_nested(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (), cls=Config):
    """Load ``path`` (or the defaults), apply ``--set`` overrides, validate everything."""
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        raw = _resolve_paths(cls, read_yaml_mapping(path), Path(path).resolve().parent)
        # Validate the file on its own first so its errors name the file.
        try:
            from_dict(cls, raw)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    for text in overrides:
        key, value = parse_override(text)
        src = f"--set {text}"
        tp, meta = _field_type(cls, key, src)
        if meta.get("path") and isinstance(value, str) and value and "\x00" not in value:
            value = str(Path(os.path.expanduser(value)).resolve())
        try:
            _convert(value, tp, meta, key)
        except ConfigError as exc:
            raise ConfigError(f"{src}: {exc}") from None
        _set_nested(raw, key, value)
    try:
        return from_dict(cls, raw)
    except ConfigError as exc:
        label = source if not overrides else f"{source} with --set {' '.join(overrides)}"
        raise ConfigError(f"{label}: {exc}") from None


def override(cfg, overrides: Sequence[str]):
    """A copy of ``cfg`` with ``--set``-style overrides applied (same validation as ``load_config``)."""
    raw = to_dict(cfg)
    for text in overrides:
        key, value = parse_override(text)
        tp, meta = _field_type(type(cfg), key, f"--set {text}")
        try:
            _convert(value, tp, meta, key)
        except ConfigError as exc:
            raise ConfigError(f"--set {text}: {exc}") from None
        _set_nested(raw, key, value)
    return from_dict(type(cfg), raw)


def dump_config(cfg) -> str:
    yaml = _yaml()
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def write_config(cfg, out_dir: str | os.PathLike, name: str = CONFIG_FILENAME) -> Path:
    """Write the resolved config into ``out_dir`` atomically; returns the file path."""
    header = "# Resolved neuroimagen config: every default filled in, paths absolute.\n"
    return write_text(Path(out_dir) / name, header + dump_config(cfg))


def describe_fields(cls=Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type description, default, doc) for every leaf field: used by ``config keys``."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        dotted = _join(prefix, f.name)
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_fields(tp, dotted))
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        rows.append((dotted, _describe(tp, dict(f.metadata)), to_dict(default) if dataclasses.is_dataclass(default) else default, f.metadata.get("doc", "")))
    return rows


_READY = True
