"""Where a generated image goes: its path relative to the run directory, and the optional PNG writer.

Every scored row names its image (``image``) and its init image (``saliency``, empty for pure-noise
variants) by a path relative to the run directory, ``results/images/s<subject>/<variant>/<stem>-<item>-
<sample>.png`` (and ``...-init.png``), whether or not the PNGs are written. :class:`PngWriter` writes them
under a root directory; :class:`~neuroimagen.reconstruction.score.Score` runs without one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from neuroimagen.atomic import atomic_path
from neuroimagen.reconstruction.rows import safe_name

IMAGE_DIR = Path("results") / "images"


def image_stem(subject: str, variant: str, stem: str, item: int, sample: int) -> Path:
    """``results/images/s<subject>/<variant>/<stem>-<item>-<sample>`` (no suffix), relative to the run directory."""
    return IMAGE_DIR / f"s{subject}" / safe_name(variant) / f"{stem}-{int(item)}-{int(sample)}"


def save_png(image: torch.Tensor, path: Path) -> None:
    """(3, H, W) in [0, 1] -> an 8-bit PNG, written atomically."""
    arr = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


class PngWriter:
    """Writes images as PNGs at paths relative to ``root`` (the run directory)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __call__(self, relative: str | Path, image: torch.Tensor) -> None:
        """``image``: (3, H, W) in [0, 1]."""
        save_png(image, self.root / relative)
