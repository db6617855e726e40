"""Captions: label captions ("An image of airliner") and per-image captions (BLIP or the twin's).

Per-image captions are a JSON object ``{stem: caption}``; the synthetic twin writes one describing
each image's attributes, standing in for BLIP.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from neuroimagen.errors import DataError

LABEL_CAPTION_TEMPLATE = "An image of {name}"


def label_caption(name: str) -> str:
    """The paper's label caption for a class name."""
    return LABEL_CAPTION_TEMPLATE.format(name=name)


def _size_word(size: float) -> str:
    return "small" if size < 0.53 else ("large" if size > 0.62 else "medium-sized")


def _place_words(cx: float, cy: float) -> str:
    v = "upper" if cy < 0.47 else ("lower" if cy > 0.53 else "middle")
    h = "left" if cx < 0.47 else ("right" if cx > 0.53 else "centre")
    if v == "middle" and h == "centre":
        return "in the centre"
    if v == "middle":
        return f"on the {h}"
    if h == "centre":
        return f"at the {v} centre"
    return f"at the {v} {h}"


def _background_word(brightness: float) -> str:
    return "dark" if brightness < 0.35 else ("bright" if brightness > 0.65 else "grey")


def attribute_caption(colour: str, shape: str, cx: float, cy: float, size: float, background: float) -> str:
    """A BLIP-like caption of the twin's image attributes, e.g. 'a large red circle at the upper left on a dark background'."""
    return f"a {_size_word(size)} {colour} {shape} {_place_words(cx, cy)} on a {_background_word(background)} background"


def load_captions(path: str | os.PathLike) -> dict[str, str]:
    """Read ``{stem: caption}``; one DataError naming the file for anything else."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: captions file not found (expected JSON {{stem: caption}})")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad UTF-8, bad JSON, a >4300-digit int
        raise DataError(f"{p}: cannot read captions ({exc.__class__.__name__}: {exc}); expected JSON {{stem: caption}}") from None
    if not isinstance(data, dict):
        raise DataError(f"{p}: expected a JSON object {{stem: caption}}, got {type(data).__name__}")
    for stem, cap in data.items():
        if not isinstance(cap, str) or not cap.strip():
            raise DataError(f"{p}: caption of '{stem}' must be a non-empty string, got {cap!r}")
    return data
