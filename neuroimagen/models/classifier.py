"""The evaluation ("judge") classifier injected into the metrics: images in, class probabilities out.

N-way top-k accuracy (ACC) and the Inception Score are computed from a pretrained classifier's softmax on
generated and ground-truth images: ViT-H/14 (SWAG weights, 518 px) for ACC in the MinD-Vis protocol and
Inception-v3 (299 px) for IS. Both live behind one interface, :class:`Classifier`, obtained in one of two ways:

    load_torchvision_classifier(arch, weights)
        the real path: a torchvision architecture (``"vit_h_14"``, ``"inception_v3"``, ``"resnet50"``...)
        filled with a LOCAL state dict file; nothing is ever downloaded.
    load_classifier(directory)
        the embedded default's stand-in when no pretrained weights are available: a small CNN
        (:class:`JudgeCNN`) trained on the dataset's own *training* images by
        ``neuroimagen.frozen.judge.train_judge`` and kept in a directory by :func:`save_classifier`.

    load_is_network(weights)
        the Inception Score network: torchvision Inception-v3 from a local ``IMAGENET1K_V1``-layout state dict,
        with those weights' own preprocessing (resize 342, centre crop 299, ImageNet mean/std) read from
        torchvision's metadata.

A judge that cannot classify GT images makes ACC meaningless, so the caller reports the classifier's
accuracy on the GT test images beside every ACC (``Classifier.describe()`` carries the training record).
That accuracy compares the classifier's top-1 with the dataset label *in the classifier's label space*: a
judge is trained on the dataset's labels (identity); an ImageNet-1k classifier's index is matched to the
dataset's WNIDs through a class-index file (:func:`read_class_index`, :func:`label_to_class`).
The IS is only "Inception Score" with Inception-v3; an IS computed with any other classifier (a judge, a
ViT, a ResNet) must be labelled as such (e.g. "IS (judge-cnn-...)").

Images everywhere are float tensors (B, 3, H, W) in [0, 1]; probabilities are (B, K) float32 on the CPU.
Torchvision is imported only inside the functions that need it (import time matters); never Ray.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuroimagen.atomic import atomic_dir
from neuroimagen.errors import ConfigError, DataError
from neuroimagen.training.checkpoint import state_to_cpu

__all__ = ["Classifier", "JudgeCNN", "save_classifier", "load_classifier", "load_torchvision_classifier",
           "load_is_network", "is_network_record", "read_class_index", "label_to_class", "file_sha256", "judge_identity", "IMAGENET_MEAN",
           "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCHEMA_VERSION = 1
_CONFIG_FILE = "classifier.json"
_WEIGHTS_FILE = "weights.pt"


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1, or ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text if len(text) <= 200 else text[:197] + "..."


def check_images(images: Any, name: str) -> Tensor:
    """Validate a (B, 3, H, W) floating tensor; DataError otherwise."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"{name}: expected a (B, 3, H, W) image tensor, got "
                        f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if not images.is_floating_point():
        raise DataError(f"{name}: expected float images in [0, 1], got dtype {images.dtype}")
    return images


def resize_images(x: Tensor, size: int) -> Tensor:
    """(B, 3, H, W) -> (B, 3, size, size): bilinear with antialiasing; unchanged if already that size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def resize_and_crop(x: Tensor, resize: int, crop: int, mode: str = "bilinear") -> Tensor:
    """(B, 3, H, W) -> (B, 3, crop, crop): the shorter side resized to ``resize`` (aspect kept, antialiased),
    then the centre ``crop`` x ``crop`` -- torchvision's ``ImageClassification`` preset (``F.resize`` with an
    int size, then ``F.center_crop``) on float tensors."""
    h, w = x.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = int(resize), int(resize * long / short)
    size = (new_short, new_long) if h <= w else (new_long, new_short)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode=mode, antialias=mode in ("bilinear", "bicubic"),
                          align_corners=False if mode in ("bilinear", "bicubic") else None)
    h, w = x.shape[-2:]
    if h < crop or w < crop:
        raise DataError(f"resize_and_crop: {h}x{w} px after resizing to {resize} is smaller than the {crop} px crop")
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return x[..., top: top + crop, left: left + crop]


class Classifier:
    """Wraps an nn.Module + preprocessing; the interface the scoring code uses.

    Attributes:
        module: the network, in eval mode; maps normalised (B, 3, S, S) images to (B, K) logits.
        num_classes: K.
        class_names: K names, or None.
        identity: short stable string naming the classifier (for cache keys and reports), e.g.
            ``judge-cnn-<hash12>`` or ``torchvision:vit_h_14@/path/to/weights.pth``.
        kind: ``"judge"`` (trained on the dataset's own training images) or ``"torchvision"``.
        input_size: S, the resolution of the network's input.
        resize_size: None: images are resized to S x S; an int R: the shorter side is resized to R and the centre
            S x S cropped (torchvision's preset for pretrained weights, e.g. Inception-v3's 342 -> 299).
        mean, std: per-channel normalisation applied after resizing.
        record: json-able facts recorded when the classifier was made (training accuracies, weights path...).
        spec: ``{"builder", "kwargs"}`` to rebuild the module (judges only; used by ``save_classifier``).
    """

    def __init__(self, module: nn.Module, *, num_classes: int, input_size: int, identity: str, kind: str,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 class_names: Optional[Sequence[str]] = None, record: Optional[dict] = None,
                 spec: Optional[dict] = None, resize_size: Optional[int] = None):
        if class_names is not None:
            class_names = [str(c) for c in class_names]
            if len(class_names) != num_classes:
                raise ConfigError(f"class_names: expected {num_classes} names (one per class), got {len(class_names)}")
        self.module = module.eval()
        self.module.requires_grad_(False)
        self.num_classes = int(num_classes)
        self.class_names: list[str] | None = class_names
        self.identity = str(identity)
        self.kind = str(kind)
        self.input_size = int(input_size)
        self.resize_size = None if resize_size is None else int(resize_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.record = dict(record or {})
        self.spec = spec

    def __repr__(self) -> str:
        return f"Classifier({self.identity!r}, kind={self.kind!r}, K={self.num_classes}, size={self.input_size})"

    @property
    def device(self) -> torch.device:
        """Device of the module's first parameter (CPU for a parameterless module)."""
        p = next(self.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def to(self, device) -> "Classifier":
        """Move the module to ``device``; returns self."""
        self.module.to(device)
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, S, S) resized (bilinear, antialias; with ``resize_size``: shorter side
        to R, centre crop S) and normalised, same device."""
        if self.resize_size is None:
            x = resize_images(images.float(), self.input_size)
        else:
            x = resize_and_crop(images.float(), self.resize_size, self.input_size)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def logits(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, K) float32 logits on the CPU (eval mode, no autograd)."""
        check_images(images, "images")
        batch_size = positive_int("batch_size", batch_size)
        self.module.eval()
        device = self.device
        out = []
        for start in range(0, images.shape[0], int(batch_size)):
            x = self.preprocess(images[start:start + int(batch_size)].to(device))
            y = self.module(x)
            if isinstance(y, (tuple, list)):  # e.g. Inception's (logits, aux) if ever in training mode
                y = y[0]
            out.append(y.float().cpu())
        if not out:
            return torch.zeros(0, self.num_classes)
        return torch.cat(out, dim=0)

    @property
    def has_features(self) -> bool:
        """Whether :meth:`features` is available (a judge CNN: its globally pooled last conv block)."""
        return isinstance(self.module, JudgeCNN)

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 4w) float32 on the CPU: the judge CNN's globally average-pooled features
        (the input of its linear head), with the same preprocessing as :meth:`logits`. Judges only."""
        if not self.has_features:
            raise ConfigError(f"{self.identity}: pooled features are only defined for the judge CNN")
        check_images(images, "images")
        self.module.eval()
        device = self.device
        out = [self.module.features(self.preprocess(images[i:i + int(batch_size)].to(device))).mean(dim=(2, 3))
               .float().cpu() for i in range(0, images.shape[0], int(batch_size))]
        return torch.cat(out) if out else torch.zeros(0, self.module.head.in_features)

    @torch.no_grad()
    def probs_and_features(self, images: Tensor, batch_size: int = 64) -> tuple[Tensor, Tensor]:
        """(:meth:`probs`, :meth:`features`) of the same images from one forward pass (judges only)."""
        if not self.has_features:
            raise ConfigError(f"{self.identity}: pooled features are only defined for the judge CNN")
        check_images(images, "images")
        self.module.eval()
        device = self.device
        probs, feats = [], []
        for i in range(0, images.shape[0], int(batch_size)):
            h = self.module.features(self.preprocess(images[i:i + int(batch_size)].to(device))).mean(dim=(2, 3))
            feats.append(h.float().cpu())
            probs.append(torch.softmax(self.module.head(self.module.dropout(h)).float(), dim=1).cpu())
        if not probs:
            return torch.zeros(0, self.num_classes), torch.zeros(0, self.module.head.in_features)
        return torch.cat(probs), torch.cat(feats)

    def probs(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """(B, 3, H, W) in [0, 1], any H, W -> (B, K) softmax probabilities, float32 on the CPU.

        Runs in eval mode without autograd on the module's device, ``batch_size`` images at a time; each
        batch is resized (bilinear, antialias) to ``input_size`` and normalised with ``mean``/``std``.
        """
        return torch.softmax(self.logits(images, batch_size), dim=1)

    def describe(self) -> dict:
        """json-able summary: identity, kind, num_classes, input_size, plus the recorded facts."""
        extra = {"resize_size": self.resize_size} if self.resize_size is not None else {}
        return {"identity": self.identity, "kind": self.kind, "num_classes": self.num_classes,
                "input_size": self.input_size, **extra, **self.record}


# ---------------------------------------------------------------------------------------------------------------
# The judge: a small CNN trained on the dataset's own training images
# ---------------------------------------------------------------------------------------------------------------


class JudgeCNN(nn.Module):
    """Small CNN for 32-64 px images: 3 x (conv3x3-BN-ReLU-maxpool2) with widths w, 2w, 4w, global average
    pool, dropout, linear.  (B, 3, S, S) normalised -> (B, num_classes) logits."""

    def __init__(self, num_classes: int, width: int = 16, dropout: float = 0.2):
        super().__init__()
        num_classes, width = positive_int("num_classes", num_classes), positive_int("width", width)
        if num_classes < 2:
            raise ConfigError(f"num_classes: expected >= 2, got {num_classes}")
        blocks: list[nn.Module] = []
        c_in = 3
        for c_out in (width, 2 * width, 4 * width):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, int(num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, K); S >= 8."""
        h = self.features(x).mean(dim=(2, 3))  # (B, 4w)
        return self.head(self.dropout(h))


def _state_hash(state: dict[str, Tensor], meta: dict) -> str:
    """sha256 hex of a json dump of ``meta`` and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def judge_identity(module: nn.Module, spec: dict, input_size: int, mean, std) -> str:
    """``judge-cnn-<hash12>`` of a judge's weights and preprocessing (checked again by :func:`load_classifier`)."""
    meta = {"spec": spec, "input_size": input_size, "mean": list(mean), "std": list(std)}
    return "judge-cnn-" + _state_hash(module.state_dict(), meta)[:12]


_BUILDERS = {"judge_cnn": JudgeCNN}


def save_classifier(clf: Classifier, directory: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write a judge to ``directory`` atomically: ``classifier.json`` (builder, kwargs, identity, input_size,
    class_names, mean/std, training record) and ``weights.pt`` (plain state dict on the CPU).

    Only judges can be saved (a torchvision classifier is its weights file). A non-empty ``directory`` is
    replaced unless ``overwrite=False`` (then ``OutputError``).
    """
    if clf.kind != "judge" or not clf.spec or clf.spec.get("builder") not in _BUILDERS:
        raise ConfigError(f"save_classifier: {clf.identity}: only judge classifiers can be saved "
                          f"(kind {clf.kind!r}; a torchvision classifier is its weights file)")
    doc = {"schema_version": SCHEMA_VERSION, "builder": clf.spec["builder"], "kwargs": clf.spec["kwargs"],
           "identity": clf.identity, "kind": clf.kind, "input_size": clf.input_size,
           "class_names": clf.class_names, "mean": list(clf.mean), "std": list(clf.std), "record": clf.record}
    text = json.dumps(doc, indent=1)
    with atomic_dir(directory, overwrite=overwrite) as stage:
        torch.save(state_to_cpu(clf.module.state_dict()), stage / _WEIGHTS_FILE)
        (stage / _CONFIG_FILE).write_text(text, encoding="utf-8")
    return Path(directory)


def load_classifier(directory: str | os.PathLike) -> Classifier:
    """Read a judge written by :func:`save_classifier`; a missing or corrupt directory raises ``DataError``.

    The weights are loaded with ``torch.load(weights_only=True)`` and checked against the recorded identity
    (a hash of the weights and preprocessing), so a swapped or altered ``weights.pt`` is detected.
    """
    d = Path(directory)
    expected = f"expected a judge classifier directory ({_CONFIG_FILE} + {_WEIGHTS_FILE}) written by save_classifier"
    cfg_path, w_path = d / _CONFIG_FILE, d / _WEIGHTS_FILE
    if not d.is_dir():
        raise DataError(f"{d}: no such directory; {expected}")
    if not cfg_path.is_file():
        raise DataError(f"{d}: no {_CONFIG_FILE}; {expected}")
    try:
        doc = json.loads(cfg_path.read_text(encoding="utf-8"))
        builder, kwargs = _BUILDERS[doc["builder"]], dict(doc["kwargs"])
        input_size, mean, std = int(doc["input_size"]), list(doc["mean"]), list(doc["std"])
        identity = str(doc["identity"])
        if doc.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"schema {doc.get('schema_version')} (expected {SCHEMA_VERSION})")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{cfg_path}: unreadable or incomplete ({_short(exc)}); {expected}") from exc
    if not w_path.is_file():
        raise DataError(f"{w_path}: missing; {expected}")
    try:
        state = torch.load(w_path, map_location="cpu", weights_only=True)
        module = builder(**kwargs)
        module.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - truncated file, pickled objects, wrong shapes
        raise DataError(f"{w_path}: cannot load the judge's state dict ({_short(exc)}); {expected}") from exc
    spec = {"builder": doc["builder"], "kwargs": kwargs}
    if judge_identity(module, spec, input_size, mean, std) != identity:
        raise DataError(f"{w_path}: weights do not match the identity {identity} recorded in {cfg_path}")
    try:
        return Classifier(module, num_classes=int(kwargs["num_classes"]), input_size=input_size, identity=identity,
                          kind=str(doc.get("kind", "judge")), mean=mean, std=std, class_names=doc.get("class_names"),
                          record=doc.get("record") or {}, spec=spec)
    except ConfigError as exc:
        raise DataError(f"{cfg_path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------------
# Pretrained torchvision classifiers from local state dicts
# ---------------------------------------------------------------------------------------------------------------


def _unwrap_state(obj: Any) -> Any:
    """Accept ``{"state_dict": sd}`` / ``{"model": sd}`` wrappers and DataParallel ``module.`` prefixes."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state"):
            if isinstance(obj.get(key), dict) and not any(isinstance(v, Tensor) for v in obj.values()):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
            obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _final_linear_key(model: nn.Module) -> str | None:
    names = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    return f"{names[-1]}.weight" if names else None


def _vit_image_size(state: dict) -> int | None:
    """Image size a torchvision ViT state dict was made for (from its position embeddings), or None."""
    pos, proj = state.get("encoder.pos_embedding"), state.get("conv_proj.weight")
    if not (isinstance(pos, Tensor) and isinstance(proj, Tensor) and pos.ndim == 3 and proj.ndim == 4):
        return None
    side = math.isqrt(max(int(pos.shape[1]) - 1, 0))
    return side * int(proj.shape[-1]) if side * side == int(pos.shape[1]) - 1 else None


def _mismatch(model_state: dict, state: dict) -> str | None:
    """A short description of how ``state`` fails to fit ``model_state``, or None if it fits exactly."""
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    shapes = [k for k in model_state if k in state and (not isinstance(state[k], Tensor)
                                                       or tuple(state[k].shape) != tuple(model_state[k].shape))]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
    if shapes:
        k = shapes[0]
        got = tuple(state[k].shape) if isinstance(state[k], Tensor) else type(state[k]).__name__
        parts.append(f"{len(shapes)} shape mismatches, e.g. {k}: {got} vs {tuple(model_state[k].shape)}")
    return "; ".join(parts) or None


def load_torchvision_classifier(arch: str, weights: str | os.PathLike, *,
                                class_names: Optional[Sequence[str]] = None,
                                image_size: Optional[int] = None) -> Classifier:
    """A torchvision architecture filled with a LOCAL state dict file; nothing is ever downloaded.

    ``arch`` is a ``torchvision.models`` builder name; the model is built with ``get_model(arch,
    weights=None, ...)`` (on the meta device, then the tensors of the file are assigned) and loaded
    with ``strict=True`` from ``torch.load(weights, map_location="cpu", weights_only=True)`` (a
    ``{"state_dict": ...}`` wrapper and ``module.`` prefixes are accepted). Special cases:

    * ``vit_*``: ``image_size`` is passed to the builder; if None it is read from the file's position
      embeddings (518 for ViT-H/14 SWAG-E2E), else 224. Images are resized to it.
    * ``inception_v3``: built with ``aux_logits=True, init_weights=False, transform_input=True`` (as
      torchvision does for its pretrained weights, which expect that input transform); the main logits are
      used. Images are resized to 299.
    * others: 224 px, or ``image_size`` if given (resize only).

    A head with another number of classes than 1000 is detected from the file. Preprocessing: ImageNet
    mean/std. ``num_classes`` is the network's output size. A missing file, an unreadable one or a state
    dict that does not fit raises ``ConfigError("<weights>: ...")``.
    """
    path = Path(os.fspath(weights)).expanduser()
    import torchvision  # noqa: PLC0415 - only for these optional classifiers: the judge path stays free of it

    names = set(torchvision.models.list_models())
    if arch not in names:
        raise ConfigError(f"{weights}: unknown torchvision architecture {arch!r} (expected a torchvision.models "
                          f"builder name such as vit_h_14, inception_v3, resnet50)")
    if image_size is not None:
        image_size = positive_int(f"{weights}: image_size", image_size)
    if not path.is_file():
        raise ConfigError(f"{weights}: no such file (expected a local state dict .pth for torchvision {arch}; "
                          f"nothing is downloaded)")
    try:
        state = _unwrap_state(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001 - truncated, not a torch file, pickled objects
        raise ConfigError(f"{weights}: cannot read a state dict ({_short(exc)})") from exc
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{weights}: expected a state dict (name -> tensor) for torchvision {arch}, got "
                          f"{type(state).__name__}")

    kwargs: dict[str, Any] = {}
    if arch.startswith("vit_"):
        size = int(image_size) if image_size is not None else (_vit_image_size(state) or 224)
        kwargs["image_size"] = size
    elif arch == "inception_v3":
        kwargs.update(aux_logits=True, init_weights=False, transform_input=True)
        size = int(image_size) if image_size is not None else 299
    else:
        size = int(image_size) if image_size is not None else 224

    def build(on_meta: bool) -> nn.Module:
        if on_meta:
            with torch.device("meta"):
                return torchvision.models.get_model(arch, weights=None, **kwargs)
        return torchvision.models.get_model(arch, weights=None, **kwargs)

    try:
        model = build(on_meta=True)
        head = _final_linear_key(model)
        ref = model.state_dict()
        if head and head in state and head in ref and state[head].ndim == 2 \
                and state[head].shape[0] != ref[head].shape[0]:
            kwargs["num_classes"] = int(state[head].shape[0])  # a fine-tuned head
            model = build(on_meta=True)
            ref = model.state_dict()
    except Exception as exc:  # noqa: BLE001 - builder rejected the arguments
        raise ConfigError(f"{weights}: cannot build torchvision {arch} with {kwargs} ({_short(exc)})") from exc
    problem = _mismatch(ref, state)
    if problem:
        raise ConfigError(f"{weights}: state dict does not fit torchvision {arch} ({problem})")
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.empty(1, 3, size, size, device="meta"))
    except Exception as exc:  # noqa: BLE001 - e.g. an image size the architecture cannot take
        raise ConfigError(f"{weights}: torchvision {arch} cannot run on {size} px images ({_short(exc)})") from exc
    if isinstance(out, (tuple, list)):
        out = out[0]
    num_classes = int(out.shape[-1])
    try:
        model.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
            model = build(on_meta=False)  # non-persistent buffers: build for real and copy
            model.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{weights}: state dict does not fit torchvision {arch} ({_short(exc)})") from exc
    model = model.float().eval()
    identity = f"torchvision:{arch}@{path.resolve()}"
    if image_size is not None and not arch.startswith("vit_"):
        identity += f"#{size}px"
    record = {"arch": arch, "weights": str(path.resolve())}
    return Classifier(model, num_classes=num_classes, input_size=size, identity=identity, kind="torchvision",
                      mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=class_names, record=record)


# ---------------------------------------------------------------------------------------------------------------
# The Inception Score network: torchvision Inception-v3 with its weights' own preprocessing
# ---------------------------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inception_v3_preset() -> dict:
    """torchvision's preprocessing and file facts of ``Inception_V3_Weights.IMAGENET1K_V1``, read from the
    weights' metadata (nothing is downloaded): ``resize_size`` (342), ``crop_size`` (299), ``interpolation``
    ("bilinear"), ``mean``/``std`` (ImageNet), ``url`` and ``sha256_prefix`` (the hash in the file's name)."""
    from torchvision.models import Inception_V3_Weights  # noqa: PLC0415 - the judge path stays free of torchvision

    w = Inception_V3_Weights.IMAGENET1K_V1
    t = w.transforms()
    stem = Path(w.url).stem  # inception_v3_google-0cc3c7bd
    return {"weights": "Inception_V3_Weights.IMAGENET1K_V1", "resize_size": int(t.resize_size[0]),
            "crop_size": int(t.crop_size[0]), "interpolation": str(t.interpolation.value), "mean": list(t.mean),
            "std": list(t.std), "antialias": bool(t.antialias), "url": w.url,
            "sha256_prefix": stem.rsplit("-", 1)[-1] if "-" in stem else ""}


def load_is_network(weights: str | os.PathLike, *, sha256: Optional[str] = None) -> Classifier:
    """The Inception Score network: torchvision ``inception_v3`` filled with a LOCAL state dict in the
    ``IMAGENET1K_V1`` layout (1000 ImageNet classes), with those weights' own preprocessing read from
    torchvision's metadata (:func:`inception_v3_preset`: shorter side resized to 342 px, bilinear with
    antialiasing, centre crop 299 px, ImageNet mean/std; the network's ``transform_input=True`` then maps that
    normalisation to the one the ported Google weights expect, as torchvision's pretrained builder does).

    ``identity``: ``inception_v3@<path>#sha256:<12 hex>``; ``record`` holds the full ``weights_sha256``, whether it
    matches the hash in torchvision's own file name (``torchvision_file``) and the preprocessing. ``sha256`` (the
    file's digest, if the caller computed it) skips hashing the file again. A file that does not fit, or a head
    without 1000 outputs, raises ``ConfigError("<weights>: ...")``.
    """
    preset = inception_v3_preset()
    if preset["interpolation"] not in ("bilinear", "bicubic", "nearest"):
        raise ConfigError(f"{weights}: torchvision's Inception-v3 preset asks for {preset['interpolation']} resizing, "
                          f"which this loader does not reproduce")
    clf = load_torchvision_classifier("inception_v3", weights)
    if clf.num_classes != 1000:
        raise ConfigError(f"{weights}: the Inception Score network must be the ImageNet-1k Inception-v3 (1000 "
                          f"outputs), got {clf.num_classes} outputs")
    record = is_network_record(weights, sha256)
    return Classifier(clf.module, num_classes=clf.num_classes, input_size=preset["crop_size"],
                      resize_size=preset["resize_size"], identity=record["identity"], kind="inception",
                      mean=preset["mean"], std=preset["std"], record=record)


def is_network_record(weights: str | os.PathLike, sha256: Optional[str] = None) -> dict:
    """What identifies an Inception-v3 IS network without loading it: ``identity``
    (``inception_v3@<path>#sha256:<12 hex>``), ``weights``, ``weights_sha256``, ``torchvision_file`` (the digest
    starts with the hash in torchvision's own IMAGENET1K_V1 file name), ``input_size`` and ``preprocessing``."""
    preset = inception_v3_preset()
    path = Path(os.fspath(weights)).expanduser().resolve()
    digest = sha256 or file_sha256(path)
    return {"identity": f"inception_v3@{path}#sha256:{digest[:12]}", "arch": "inception_v3", "weights": str(path),
            "weights_sha256": digest,
            "torchvision_file": bool(preset["sha256_prefix"]) and digest.startswith(preset["sha256_prefix"]),
            "input_size": preset["crop_size"],
            "preprocessing": f"{preset['weights']} transforms: resize {preset['resize_size']} "
                             f"{preset['interpolation']} (antialias {preset['antialias']}), centre crop "
                             f"{preset['crop_size']}, mean {preset['mean']}, std {preset['std']}"}


# ---------------------------------------------------------------------------------------------------------------
# The classifier's label space: its class index -> WNID, and the dataset's labels in it
# ---------------------------------------------------------------------------------------------------------------


def _wnid(value: Any, where: str) -> str:
    text = str(value).strip()
    if not (len(text) == 9 and text[0] == "n" and text[1:].isdigit()):
        raise ConfigError(f"{where}: {value!r} is not a WordNet id (expected 'n' + 8 digits, e.g. n02106662)")
    return text


def read_class_index(path: str | os.PathLike) -> list[str]:
    """The WNID of each of a classifier's classes, in class-index order, from a file of one of two layouts:

    * JSON in the ``imagenet_class_index.json`` layout, ``{"0": ["n01440764", "tench"], "1": [...], ...}`` (keys
      exactly 0..K-1; a value may also be the bare WNID string), or a JSON list of such values;
    * text: one class per line in index order, the WNID first (``n01440764`` or ``n01440764 tench, Tinca tinca``,
      as in ``LOC_synset_mapping.txt``); blank lines are skipped.

    A missing or malformed file, a non-WNID entry or a repeated WNID raises ``ConfigError("<path>: ...")``.
    """
    p = Path(os.fspath(path)).expanduser()
    expected = ('expected imagenet_class_index.json ({"0": ["n01440764", "tench"], ...}) or one WNID per line '
                'in class-index order')
    if not p.is_file():
        raise ConfigError(f"{path}: no such file ({expected})")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable ({_short(exc)}); {expected}") from exc
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{path}: not valid JSON ({_short(exc)}); {expected}") from exc
        if isinstance(doc, dict):
            keys = sorted(doc, key=lambda k: int(k) if str(k).isdigit() else -1)
            if [str(k) for k in keys] != [str(i) for i in range(len(doc))]:
                raise ConfigError(f"{path}: keys must be the class indices 0..{len(doc) - 1}; {expected}")
            values = [doc[k] for k in keys]
        else:
            values = list(doc)
        ids = [_wnid(v[0] if isinstance(v, (list, tuple)) and v else v, f"{path}: class {i}")
               for i, v in enumerate(values)]
    else:
        lines = [ln.split()[0] for ln in text.splitlines() if ln.strip()]
        ids = [_wnid(tok, f"{path}: class {i}") for i, tok in enumerate(lines)]
    if not ids:
        raise ConfigError(f"{path}: no classes; {expected}")
    seen: dict[str, int] = {}
    for i, w in enumerate(ids):
        if w in seen:
            raise ConfigError(f"{path}: {w} is listed twice (classes {seen[w]} and {i}); {expected}")
        seen[w] = i
    return ids


def label_to_class(dataset_ids: Sequence[str], classifier_ids: Sequence[str], source: str,
                   missing: Optional[int] = None) -> list[int]:
    """Index among ``classifier_ids`` of each dataset class (``dataset_ids``: the dataset's WNIDs in label order).

    A dataset class missing from the classifier's classes raises ``ConfigError("<source>: ...")`` naming it, or,
    with ``missing`` (e.g. -1), maps to that value (the caller then knows which labels the classifier cannot judge).
    """
    where = {w: i for i, w in enumerate(classifier_ids)}
    out = []
    for label, w in enumerate(dataset_ids):
        if w not in where and missing is not None:
            out.append(int(missing))
            continue
        if w not in where:
            raise ConfigError(f"{source}: the dataset's class {w} (label {label}) is not among its {len(where)} "
                              f"classes (expected a WNID for every dataset class)")
        out.append(where[w])
    return out
