"""Feature networks of the MindEye reconstruction suite, loaded from LOCAL weights only (nothing is downloaded).

Source: MindEye 1 ``src/Reconstruction_Metrics.py`` (MedARC-AI/fMRI-reconstruction-NSD), unchanged in MindEye 2
``src/final_evaluations.ipynb`` (MedARC-AI/MindEyeV2).  Each network maps images (B, 3, H, W) in [0, 1] to
flattened features ``{name: (B, D) float32}``; the metrics (``neuroimagen.metrics.twoway``) compare them.

=========  ===============================================  ============  ====================  ======================
name       network (MindEye's weights)                      node          preprocessing         metric
=========  ===============================================  ============  ====================  ======================
alexnet2   torchvision ``alexnet`` (IMAGENET1K_V1)          features.4    Resize 256, ImageNet  two-way identification
alexnet5   same network                                     features.11   Resize 256, ImageNet  two-way identification
inception  torchvision ``inception_v3`` (IMAGENET1K_V1)     avgpool       Resize 342, ImageNet  two-way identification
clip       CLIP ViT-L/14 image embedding (OpenAI ``clip``)  image_embeds  Resize 224, CLIP      two-way identification
effnet     torchvision ``efficientnet_b1`` (DEFAULT = V2)   avgpool       Resize 255, ImageNet  correlation distance
swav       torchvision ``resnet50`` + SwAV 800-ep weights   avgpool       Resize 224, ImageNet  correlation distance
=========  ===============================================  ============  ====================  ======================

Preprocessing, exactly as the public code: reconstructions clamped to [0, 1] (here both images, which is the
same for ground truth in [0, 1]); both image sets resized to 256 x 256 first (MindEye's display cell, whose
result every metric inherits; ``base_resolution=None`` skips it); then ``transforms.Resize(size, BILINEAR)``
(short edge, no centre crop) and ``transforms.Normalize(mean, std)``.  torchvision 0.15/0.16 tensor resizes do
not antialias, so neither does this (``F.interpolate(bilinear, align_corners=False, antialias=False)``).

* AlexNet's two nodes come from one network, as MindEye's ``create_feature_extractor(..., return_nodes=
  ['features.4', 'features.11'])``: the ReLUs after conv 2 and conv 5, (192, 31, 31) and (256, 15, 15) at 256 px.
* Inception-v3 is built as torchvision builds it for its pretrained weights (``transform_input=True``,
  ``aux_logits=True``), so the ImageNet-normalised input is re-mapped as the weights expect.
* CLIP: MindEye calls OpenAI ``clip.load("ViT-L/14").encode_image``; the transformers equivalent is
  ``CLIPVisionModelWithProjection(...).image_embeds`` (projection of the post-layernorm class token, not
  L2-normalised), e.g. from a local copy of ``openai/clip-vit-large-patch14``.  MindEye ran it in fp16 on a GPU;
  this runs in float32.
* SwAV: MindEye's ``torch.hub.load('facebookresearch/swav:main', 'resnet50')`` is a torchvision ``resnet50``
  filled with ``swav_800ep_pretrain.pth.tar`` (``module.`` prefix stripped, ``strict=False``: the SwAV
  projection head and prototypes are dropped, ``fc`` stays random and is unused by ``avgpool``).

Loading: ``torch.load(file, map_location="cpu", weights_only=True)``; a ``{"state_dict": ...}`` / ``{"model":
...}`` wrapper and ``module.`` prefixes are accepted.  Every tensor the returned nodes depend on must be in the
file with the right shape; other keys are accepted only if they belong to the full architecture (a complete
torchvision file) or, for SwAV, to its projection head / prototypes.  Anything else (missing file, unreadable
file, another architecture) raises ``ConfigError("<file>: ...")`` in one line.

torchvision and transformers are imported inside the loaders: they are heavy, and only scoring needs them.
"""

from __future__ import annotations

import itertools
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuroimagen.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MINDEYE_BASE_RESOLUTION = 256

# which metric MindEye computes on each feature (see neuroimagen.metrics.twoway)
SUITE_METRIC = {"alexnet2": "two_way_identification", "alexnet5": "two_way_identification",
                "inception": "two_way_identification", "clip": "two_way_identification",
                "effnet": "correlation_distance", "swav": "correlation_distance"}

_SWAV_EXTRA_PREFIXES = ("projection_head.", "prototypes.")


def _resize(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """torchvision tensor ``Resize(size)``, bilinear, no antialiasing (int: short edge, aspect kept)."""
    h, w = x.shape[-2:]
    if isinstance(size, int):
        out = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    else:
        out = size
    if (h, w) == tuple(out):
        return x
    return F.interpolate(x, size=out, mode="bilinear", align_corners=False, antialias=False)


class FeatureNet(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> ``{name: (B, D) float32}`` through one frozen network.

    ``body`` maps a preprocessed batch to a dict of node outputs; ``outputs`` maps each feature name to its node.
    Preprocessing (module docstring): clamp to [0, 1], resize to ``base_resolution`` x ``base_resolution``
    (``None``: skip), resize the short edge to ``resolution`` (bilinear, no antialias), normalise.
    ``identity`` names the network, its weights and the protocol, for labelling the numbers.
    """

    def __init__(self, body: nn.Module, outputs: dict[str, str], resolution: int, mean: Sequence[float],
                 std: Sequence[float], identity: str, base_resolution: int | None = MINDEYE_BASE_RESOLUTION):
        super().__init__()
        self.body = body.eval().requires_grad_(False)
        self.outputs = dict(outputs)
        self.resolution = int(resolution)
        self.base_resolution = base_resolution
        self.identity = identity
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def __repr__(self) -> str:
        return f"FeatureNet({self.identity}, outputs={sorted(self.outputs)})"

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> the network's normalised input (B, 3, R, R') float32."""
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3 \
                or not images.is_floating_point():
            raise ValueError(f"{self.identity}: expected float images (B, 3, H, W) in [0, 1], got "
                             f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
        x = images.detach().to(device=self.mean.device, dtype=torch.float32).clamp(0, 1)
        if self.base_resolution is not None:
            x = _resize(x, (self.base_resolution, self.base_resolution))
        x = _resize(x, self.resolution)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        nodes = self.body(self.preprocess(images))
        return {name: nodes[node].float().flatten(1) for name, node in self.outputs.items()}  # (B, D) each

    @torch.no_grad()
    def extract(self, images: Tensor, batch_size: int = 16) -> dict[str, Tensor]:
        """:meth:`forward` over ``images`` in chunks of ``batch_size`` (eval mode: results do not depend on it)."""
        parts = [self(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)]
        if not parts:
            raise ValueError(f"{self.identity}: no images to extract features from")
        return {name: torch.cat([p[name] for p in parts]) for name in self.outputs}


# ---------------------------------------------------------------------------------------------------------------
# Local state dicts
# ---------------------------------------------------------------------------------------------------------------


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _read_state(path: Path, what: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (expected a local state dict .pth of {what}; nothing is "
                          f"downloaded)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, not a torch file, pickled objects
        raise ConfigError(f"{path}: cannot read a state dict of {what} ({_short(exc)})") from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict) and not any(isinstance(v, Tensor) for v in obj.values()):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                       for k, v in obj.items()):
        raise ConfigError(f"{path}: expected a state dict (name -> tensor) of {what}, got {type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _fit(extractor: nn.Module, full_keys: set[str], state: dict[str, Tensor], path: Path, what: str,
         extra_prefixes: Sequence[str] = ()) -> None:
    """Load the tensors ``extractor`` needs from ``state`` (strict on those), or ConfigError naming ``path``."""
    ref = extractor.state_dict()
    missing = [k for k in ref if k not in state]
    shapes = [k for k in ref if k in state and tuple(state[k].shape) != tuple(ref[k].shape)]
    foreign = [k for k in state if k not in full_keys and not k.startswith(tuple(extra_prefixes))]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} shape mismatches, e.g. {k}: {tuple(state[k].shape)} vs {tuple(ref[k].shape)}")
    if foreign:
        problems.append(f"{len(foreign)} keys foreign to the architecture, e.g. {foreign[0]}")
    if problems:
        raise ConfigError(f"{path}: state dict does not fit {what} ({'; '.join(problems)})")
    extractor.load_state_dict({k: state[k] for k in ref}, strict=True, assign=True)
    left = [n for n, t in itertools.chain(extractor.named_parameters(), extractor.named_buffers()) if t.is_meta]
    if left:  # a tensor that is not in the state dict (none in these architectures)
        raise ConfigError(f"{path}: {what} has tensors a state dict cannot fill, e.g. {left[0]}")


def _torchvision_features(builder: Callable[[Any], nn.Module], weights: str | os.PathLike, nodes: list[str],
                          what: str, extra_prefixes: Sequence[str] = ()) -> tuple[nn.Module, Path]:
    from torchvision.models.feature_extraction import create_feature_extractor  # noqa: PLC0415 - heavy, scoring only

    path = Path(os.fspath(weights)).expanduser()
    state = _read_state(path, what)
    with torch.device("meta"):  # no random init of weights that the file replaces (AlexNet's head alone: 58 M)
        model = builder().eval()
    full_keys = set(model.state_dict())
    with warnings.catch_warnings():  # Inception's eval graph lacks the train-only AuxLogits: expected here
        warnings.filterwarnings("ignore", message="NOTE: The nodes obtained by tracing the model in eval mode")
        extractor = create_feature_extractor(model, return_nodes=nodes)
    _fit(extractor, full_keys, state, path, what, extra_prefixes)
    return extractor.float().eval(), path.resolve()  # float32 whatever the file's dtype (assign keeps it)


def load_alexnet(weights: str | os.PathLike, base_resolution: int | None = MINDEYE_BASE_RESOLUTION) -> FeatureNet:
    """AlexNet(2) / AlexNet(5) features (``features.4`` / ``features.11``) from a local torchvision state dict.

    Outputs ``alexnet2`` (B, 192 * 31 * 31) and ``alexnet5`` (B, 256 * 15 * 15) at MindEye's 256 px input
    (Resize 256, ImageNet mean/std).  The file may hold the whole network or only ``features.*``.
    """
    import torchvision  # noqa: PLC0415 - heavy, scoring only

    body, path = _torchvision_features(lambda: torchvision.models.alexnet(weights=None), weights,
                                       ["features.4", "features.11"], "torchvision alexnet")
    return FeatureNet(body, {"alexnet2": "features.4", "alexnet5": "features.11"}, 256, IMAGENET_MEAN,
                      IMAGENET_STD, f"alexnet@{path} (MindEye: features.4/features.11, Resize 256)",
                      base_resolution)


def load_inception_v3(weights: str | os.PathLike,
                      base_resolution: int | None = MINDEYE_BASE_RESOLUTION) -> FeatureNet:
    """Inception-v3 ``avgpool`` features (B, 2048) from a local torchvision state dict (Resize 342, ImageNet)."""
    import torchvision  # noqa: PLC0415 - heavy, scoring only

    def build() -> nn.Module:  # as torchvision builds it for IMAGENET1K_V1
        return torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=True,
                                               init_weights=False)

    body, path = _torchvision_features(build, weights, ["avgpool"], "torchvision inception_v3")
    return FeatureNet(body, {"inception": "avgpool"}, 342, IMAGENET_MEAN, IMAGENET_STD,
                      f"inception_v3@{path} (MindEye: avgpool, Resize 342)", base_resolution)


def load_efficientnet_b1(weights: str | os.PathLike,
                         base_resolution: int | None = MINDEYE_BASE_RESOLUTION) -> FeatureNet:
    """EfficientNet-B1 ``avgpool`` features (B, 1280) from a local torchvision state dict (Resize 255, ImageNet)."""
    import torchvision  # noqa: PLC0415 - heavy, scoring only

    body, path = _torchvision_features(lambda: torchvision.models.efficientnet_b1(weights=None), weights,
                                       ["avgpool"], "torchvision efficientnet_b1")
    return FeatureNet(body, {"effnet": "avgpool"}, 255, IMAGENET_MEAN, IMAGENET_STD,
                      f"efficientnet_b1@{path} (MindEye: avgpool, Resize 255)", base_resolution)


def load_swav_resnet50(weights: str | os.PathLike,
                       base_resolution: int | None = MINDEYE_BASE_RESOLUTION) -> FeatureNet:
    """SwAV ResNet-50 ``avgpool`` features (B, 2048) from a local copy of ``swav_800ep_pretrain.pth.tar``.

    Also accepts a plain torchvision ``resnet50`` state dict.  Resize 224, ImageNet mean/std.
    """
    import torchvision  # noqa: PLC0415 - heavy, scoring only

    body, path = _torchvision_features(lambda: torchvision.models.resnet50(weights=None), weights, ["avgpool"],
                                       "SwAV resnet50", extra_prefixes=_SWAV_EXTRA_PREFIXES)
    return FeatureNet(body, {"swav": "avgpool"}, 224, IMAGENET_MEAN, IMAGENET_STD,
                      f"swav_resnet50@{path} (MindEye: avgpool, Resize 224)", base_resolution)


# ---------------------------------------------------------------------------------------------------------------
# CLIP (transformers, local folder)
# ---------------------------------------------------------------------------------------------------------------


class _ClipImageEmbeds(nn.Module):
    """pixel_values (B, 3, 224, 224) -> {"image_embeds": (B, projection_dim)} (OpenAI ``encode_image``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"image_embeds": self.model(pixel_values=x).image_embeds}


def load_clip_vision(folder: str | os.PathLike,
                     base_resolution: int | None = MINDEYE_BASE_RESOLUTION) -> FeatureNet:
    """CLIP image embeddings (B, projection_dim; 768 for ViT-L/14) from a LOCAL transformers folder.

    ``folder`` holds a ``CLIPVisionModelWithProjection`` or a full ``CLIPModel`` (e.g. a copy of
    ``openai/clip-vit-large-patch14``), loaded with ``local_files_only=True`` in float32.  Preprocessing:
    Resize to the model's ``image_size`` (224 for ViT-L/14; bilinear), CLIP mean/std; no centre crop (as
    MindEye).  The identity records the hidden size, patch size and image size of what was loaded.
    """
    path = Path(os.fspath(folder)).expanduser()
    what = "a CLIPVisionModelWithProjection or CLIPModel (transformers; e.g. openai/clip-vit-large-patch14)"
    if not path.is_dir():
        raise ConfigError(f"{path}: no such directory (expected a local folder holding {what}; nothing is "
                          f"downloaded)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: no config.json (expected a local folder holding {what})")
    from transformers import CLIPVisionModelWithProjection  # noqa: PLC0415 - ~7 s to import, scoring only

    try:
        model, info = CLIPVisionModelWithProjection.from_pretrained(
            str(path), local_files_only=True, dtype=torch.float32, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the folder does not hold such a model
        raise ConfigError(f"{path}: cannot load {what} ({_short(exc)})") from exc
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        raise ConfigError(f"{path}: does not hold CLIP vision weights with a projection ({len(missing)} missing, "
                          f"e.g. {sorted(missing)[0]})")
    cfg = model.config
    identity = (f"clip_vision@{path.resolve()} (hidden {cfg.hidden_size}, patch {cfg.patch_size}, "
                f"{cfg.image_size} px; MindEye: image embedding, Resize {cfg.image_size})")
    return FeatureNet(_ClipImageEmbeds(model.float()), {"clip": "image_embeds"}, int(cfg.image_size), CLIP_MEAN,
                      CLIP_STD, identity, base_resolution)


def build_tiny_clip_vision(seed: int = 0, dim: int = 64, image_size: int = 32, patch_size: int = 8,
                           num_layers: int = 2, num_heads: int = 2) -> FeatureNet:
    """A small real ``CLIPVisionModelWithProjection`` built offline (hidden ``dim``, MLP ``4 * dim``, projection
    ``dim``, ``image_size`` px in ``patch_size`` patches), initialised under ``torch.manual_seed(seed)`` with the
    global RNG state restored: the same arguments give the same weights. Wrapped like :func:`load_clip_vision`
    (image embeddings (B, dim), CLIP mean/std, no 256 px pre-resize), for tests and the demo."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: PLC0415 - heavy, stage only

    if dim % num_heads:
        raise ValueError(f"dim: expected a multiple of num_heads={num_heads}, got {dim}")
    config = CLIPVisionConfig(hidden_size=dim, intermediate_size=4 * dim, projection_dim=dim,
                              num_hidden_layers=num_layers, num_attention_heads=num_heads, image_size=image_size,
                              patch_size=patch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(config).float().eval()
    identity = (f"tiny_clip_vision(seed {seed}, dim {dim}, {num_layers} layers, patch {patch_size}, {image_size} px; "
                "random init, in code)")
    return FeatureNet(_ClipImageEmbeds(model), {"clip": "image_embeds"}, image_size, CLIP_MEAN, CLIP_STD, identity,
                      base_resolution=None)
