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

A judge that cannot classify GT images makes ACC meaningless, so the caller reports the classifier's
accuracy on the GT test images beside every ACC (``Classifier.describe()`` carries the training record).
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
           "judge_identity", "IMAGENET_MEAN", "IMAGENET_STD"]

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


class Classifier:
    """Wraps an nn.Module + preprocessing; the interface the scoring code uses.

    Attributes:
        module: the network, in eval mode; maps normalised (B, 3, S, S) images to (B, K) logits.
        num_classes: K.
        class_names: K names, or None.
        identity: short stable string naming the classifier (for cache keys and reports), e.g.
            ``judge-cnn-<hash12>`` or ``torchvision:vit_h_14@/path/to/weights.pth``.
        kind: ``"judge"`` (trained on the dataset's own training images) or ``"torchvision"``.
        input_size: S, the resolution images are resized to before the network.
        mean, std: per-channel normalisation applied after resizing.
        record: json-able facts recorded when the classifier was made (training accuracies, weights path...).
        spec: ``{"builder", "kwargs"}`` to rebuild the module (judges only; used by ``save_classifier``).
    """

    def __init__(self, module: nn.Module, *, num_classes: int, input_size: int, identity: str, kind: str,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 class_names: Optional[Sequence[str]] = None, record: Optional[dict] = None,
                 spec: Optional[dict] = None):
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
        """(B, 3, H, W) in [0, 1] -> (B, 3, S, S) resized (bilinear, antialias) and normalised, same device."""
        x = resize_images(images.float(), self.input_size)
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

    def probs(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """(B, 3, H, W) in [0, 1], any H, W -> (B, K) softmax probabilities, float32 on the CPU.

        Runs in eval mode without autograd on the module's device, ``batch_size`` images at a time; each
        batch is resized (bilinear, antialias) to ``input_size`` and normalised with ``mean``/``std``.
        """
        return torch.softmax(self.logits(images, batch_size), dim=1)

    def describe(self) -> dict:
        """json-able summary: identity, kind, num_classes, input_size, plus the recorded facts."""
        return {"identity": self.identity, "kind": self.kind, "num_classes": self.num_classes,
                "input_size": self.input_size, **self.record}


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
