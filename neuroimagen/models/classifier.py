"""The evaluation ("judge") classifier injected into the metrics: images in, class probabilities out.

N-way top-k accuracy (ACC) and the Inception Score are computed from a pretrained classifier's softmax on
generated and ground-truth images: ViT-H/14 (SWAG weights, 518 px) for ACC in the MinD-Vis protocol and
Inception-v3 (299 px) for IS. Both live behind one interface, :class:`Classifier`, obtained in one of two ways:

    load_torchvision_classifier(arch, weights)
        the real path: a torchvision architecture (``"vit_h_14"``, ``"inception_v3"``, ``"resnet50"``...)
        filled with a LOCAL state dict file; nothing is ever downloaded.
    train_judge(images, labels, num_classes)
        the embedded default's stand-in when no pretrained weights are available: a small CNN
        (:class:`JudgeCNN`) trained in seconds on the dataset's own *training* images, with augmentation
        (shift/zoom, flip, colour jitter, blur, noise) so that it tolerates blurry, shifted, colour-shifted
        generated images. ``save_classifier`` / ``load_classifier`` keep it in a directory, and
        ``judge_cache_key`` hashes its inputs so the caller can cache it by config hash.

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

from neuroimagen.errors import ConfigError, DataError

__all__ = ["Classifier", "JudgeCNN", "augment_batch", "train_judge", "save_classifier", "load_classifier",
           "judge_cache_key", "load_torchvision_classifier", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCHEMA_VERSION = 1
JUDGE_VERSION = 1  # bump when train_judge's recipe changes: invalidates judge_cache_key caches
_CONFIG_FILE = "classifier.json"
_WEIGHTS_FILE = "weights.pt"


def _positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1, or ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _check_images(images: Any, name: str) -> Tensor:
    """Validate a (B, 3, H, W) floating tensor; DataError otherwise."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"{name}: expected a (B, 3, H, W) image tensor, got "
                        f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if not images.is_floating_point():
        raise DataError(f"{name}: expected float images in [0, 1], got dtype {images.dtype}")
    return images


def _resize(x: Tensor, size: int) -> Tensor:
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
        x = _resize(images.float(), self.input_size)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def logits(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, K) float32 logits on the CPU (eval mode, no autograd)."""
        _check_images(images, "images")
        batch_size = _positive_int("batch_size", batch_size)
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
        num_classes, width = _positive_int("num_classes", num_classes), _positive_int("width", width)
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


def _uniform(b: int, low: float, high: float, g: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(b, generator=g)


def _gaussian_kernels(sigma: Tensor, radius: int) -> Tensor:
    """(B,) sigmas (0 = identity) -> (B, 2 * radius + 1) normalised 1-D Gaussian kernels."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)  # (k,)
    k = torch.exp(-0.5 * (t[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)  # (B, k); sigma ~ 0 -> delta
    return k / k.sum(dim=1, keepdim=True)


def augment_batch(x: Tensor, g: torch.Generator, blur_p: float = 0.3) -> Tensor:
    """Random augmentation of (B, 3, S, S) images in [0, 1] -> (B, 3, S, S) in [0, 1]; randomness only from g.

    Per sample: zoom 0.8-1.1 of the field of view and a shift of up to 1/8 of the size (reflection
    padding), horizontal flip (p=0.5), Gaussian blur with sigma 0.3-1.2 px (p=``blur_p``), saturation
    0.7-1.3, contrast 0.7-1.3, brightness +-0.1, per-channel gain 0.9-1.1, Gaussian noise sigma 0-0.04.
    """
    b, c, h, w = x.shape
    # geometry: output pixel p samples the input at theta @ p (normalised coordinates)
    scale = _uniform(b, 0.8, 1.1, g)
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    shift = _uniform(2 * b, -0.25, 0.25, g).view(b, 2)  # 0.25 normalised = 1/8 of the size
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # blur: separable per-sample kernels through a grouped convolution
    radius = 3 if min(h, w) > 3 else 0
    sigma = torch.where(torch.rand(b, generator=g) < blur_p, _uniform(b, 0.3, 1.2, g), torch.zeros(b))
    if radius and bool((sigma > 0).any()):
        k = _gaussian_kernels(sigma, radius).repeat_interleave(c, dim=0)  # (B*C, k)
        y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
        y = F.conv2d(y, k[:, None, None, :], groups=b * c)
        y = F.conv2d(y, k[:, None, :, None], groups=b * c)
        x = y.reshape(b, c, h, w)
    # colour
    gray = x.mean(dim=1, keepdim=True)  # (B, 1, S, S)
    x = gray + (x - gray) * _uniform(b, 0.7, 1.3, g).view(b, 1, 1, 1)  # saturation
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    x = m + (x - m) * _uniform(b, 0.7, 1.3, g).view(b, 1, 1, 1)  # contrast
    x = x + _uniform(b, -0.1, 0.1, g).view(b, 1, 1, 1)  # brightness
    x = x * _uniform(b * c, 0.9, 1.1, g).view(b, c, 1, 1)  # colour cast
    # sensor noise
    x = x + torch.randn(x.shape, generator=g) * _uniform(b, 0.0, 0.04, g).view(b, 1, 1, 1)
    return x.clamp(0.0, 1.0)


def _check_labels(labels: Any, n: int, num_classes: int, name: str) -> Tensor:
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.shape[0] != n:
        raise DataError(f"{name}: expected ({n},) integer labels, got "
                        f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataError(f"{name}: expected integer labels, got dtype {labels.dtype}")
    labels = labels.long().cpu()
    lo, hi = (int(labels.min()), int(labels.max())) if n else (0, 0)
    if lo < 0 or hi >= num_classes:
        raise DataError(f"{name}: labels must lie in [0, {num_classes}), got [{lo}, {hi}]")
    return labels


def _state_hash(state: dict[str, Tensor], meta: dict) -> str:
    """sha256 hex of a json dump of ``meta`` and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _judge_identity(module: nn.Module, spec: dict, input_size: int, mean, std) -> str:
    meta = {"spec": spec, "input_size": input_size, "mean": list(mean), "std": list(std)}
    return "judge-cnn-" + _state_hash(module.state_dict(), meta)[:12]


def _accuracy(clf: Classifier, images: Tensor, labels: Tensor) -> float:
    pred = clf.probs(images).argmax(dim=1)
    return float((pred == labels).float().mean()) if labels.numel() else float("nan")


def train_judge(images: Tensor, labels: Tensor, num_classes: int, *, val_images: Optional[Tensor] = None,
                val_labels: Optional[Tensor] = None, input_size: int = 32, width: int = 16, steps: int = 300,
                batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                class_names: Optional[Sequence[str]] = None, progress: bool = False) -> Classifier:
    """Train a :class:`JudgeCNN` on (N, 3, H, W) images in [0, 1] and (N,) int64 labels in [0, num_classes).

    Images are resized once to ``input_size`` (bilinear, antialias) and normalised with the training set's
    per-channel mean/std; every step draws ``batch_size`` images (epoch-wise permutations), augments them
    with :func:`augment_batch` and takes an AdamW step (weight decay 0.01) under a cosine learning-rate
    schedule from ``lr`` to 0 with a 5 % linear warm-up. Trains on the CPU; deterministic given ``seed``
    (initialisation under ``torch.manual_seed(seed)``, with the global RNG state restored afterwards;
    batches and augmentation from a ``torch.Generator``). About 4 s for N=120 at 32 px with the defaults
    on one CPU thread (plus ~2 s the first time, importing ``torch._dynamo`` for ``torch.optim``).

    The returned classifier's ``describe()`` records ``train_accuracy`` (un-augmented training images),
    ``val_accuracy`` (if ``val_images``/``val_labels`` are given, else None), ``steps``, ``n_train``
    and the other hyper-parameters.
    """
    images = _check_images(images, "images")
    n = images.shape[0]
    if n < 2:
        raise DataError(f"images: expected at least 2 training images, got {n}")
    for name, value in (("num_classes", num_classes), ("width", width), ("input_size", input_size),
                        ("steps", steps), ("batch_size", batch_size)):
        _positive_int(name, value)
    if num_classes < 2:
        raise ConfigError(f"num_classes: expected >= 2, got {num_classes}")
    if class_names is not None and len(class_names) != num_classes:
        raise ConfigError(f"class_names: expected {num_classes} names (one per class), got {len(class_names)}")
    if input_size < 8:
        raise ConfigError(f"input_size: expected >= 8 (three 2x poolings), got {input_size}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr: expected a positive number, got {lr!r}")
    labels = _check_labels(labels, n, num_classes, "labels")
    if (val_images is None) != (val_labels is None):
        raise ConfigError("val_images/val_labels: pass both or neither")
    if val_images is not None:
        val_images = _check_images(val_images, "val_images")
        val_labels = _check_labels(val_labels, val_images.shape[0], num_classes, "val_labels")
    spec = {"builder": "judge_cnn", "kwargs": {"num_classes": int(num_classes), "width": int(width)}}

    x_all = _resize(images.detach().float().cpu(), int(input_size)).clamp(0.0, 1.0)  # (N, 3, S, S)
    mean = x_all.mean(dim=(0, 2, 3))
    std = x_all.std(dim=(0, 2, 3)).clamp_min(1e-3)
    mean_v, std_v = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
    bs = min(int(batch_size), n)
    warmup = max(1, int(0.05 * steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    from tqdm.auto import tqdm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = JudgeCNN(**spec["kwargs"]).to(memory_format=torch.channels_last)  # ~1.7x faster max-pooling on CPU
        g = torch.Generator().manual_seed(int(seed))
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        model.train()
        order = torch.empty(0, dtype=torch.long)
        bar = tqdm(total=int(steps), desc="judge", disable=None if progress else True, leave=False)
        try:
            for _ in range(int(steps)):
                if order.numel() < bs:
                    order = torch.cat([order, torch.randperm(n, generator=g)])
                idx, order = order[:bs], order[bs:]
                x = ((augment_batch(x_all[idx], g) - mean_v) / std_v).contiguous(memory_format=torch.channels_last)
                loss = F.cross_entropy(model(x), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                if progress:
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        finally:
            bar.close()
    model = model.to(memory_format=torch.contiguous_format).eval()  # same numerics as a loaded judge
    identity = _judge_identity(model, spec, int(input_size), mean.tolist(), std.tolist())
    clf = Classifier(model, num_classes=int(num_classes), input_size=int(input_size), identity=identity,
                     kind="judge", mean=mean.tolist(), std=std.tolist(), class_names=class_names, spec=spec)
    clf.record = {
        "train_accuracy": _accuracy(clf, images.detach().cpu(), labels),
        "val_accuracy": _accuracy(clf, val_images.detach().cpu(), val_labels) if val_images is not None else None,
        "n_train": int(n), "n_val": int(val_images.shape[0]) if val_images is not None else 0,
        "steps": int(steps), "batch_size": int(batch_size), "lr": float(lr), "width": int(width),
        "seed": int(seed), "judge_version": JUDGE_VERSION,
    }
    return clf


def judge_cache_key(images_identity: str, **hyper) -> str:
    """sha256 hex[:16] of a json dump of ``images_identity``, the hyper-parameters and ``JUDGE_VERSION``.

    For the caller to cache a trained judge by (training images, train_judge kwargs).
    """
    doc = {"images": str(images_identity), "judge_version": JUDGE_VERSION, "hyper": hyper}
    text = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


_BUILDERS = {"judge_cnn": JudgeCNN}


def save_classifier(clf: Classifier, directory: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write a judge to ``directory`` atomically: ``classifier.json`` (builder, kwargs, identity, input_size,
    class_names, mean/std, training record) and ``weights.pt`` (plain state dict on the CPU).

    Only judges can be saved (a torchvision classifier is its weights file). A non-empty ``directory`` is
    replaced unless ``overwrite=False`` (then ``OutputError``).
    """
    from neuroimagen.atomic import atomic_dir
    from neuroimagen.training.checkpoint import state_to_cpu

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
    if _judge_identity(module, spec, input_size, mean, std) != identity:
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
    import torchvision

    path = Path(os.fspath(weights)).expanduser()
    names = set(torchvision.models.list_models())
    if arch not in names:
        raise ConfigError(f"{weights}: unknown torchvision architecture {arch!r} (expected a torchvision.models "
                          f"builder name such as vit_h_14, inception_v3, resnet50)")
    if image_size is not None:
        image_size = _positive_int(f"{weights}: image_size", image_size)
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
