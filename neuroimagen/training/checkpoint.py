"""Checkpoints: self-describing directories of plain state dicts + JSON, written atomically.

    <dir>/meta.json              schema version, stage, epoch, metrics, history, best, model specs, data
    <dir>/module-<name>.pt       state dict of each trainable module (unwrapped: no 'module.' prefixes)
    <dir>/optimizer-<name>.pt    optimizer state dicts
    <dir>/best-<name>.pt         weights of the best epoch so far (model selection on validation data)

Everything loads with ``torch.load(weights_only=True)``: no pickled Python objects.
An exported model (``<run>/<stage>/model/``) is ``model.json`` (builder + kwargs) + ``<name>.pt``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from neuroimagen.atomic import atomic_dir
from neuroimagen.errors import DataError

SCHEMA_VERSION = 1


def save_checkpoint(directory: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` = {'meta', 'modules', 'optimizers', 'best'} into ``directory`` (must be new/empty)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = {}
    for group, prefix in (("modules", "module"), ("optimizers", "optimizer"), ("best", "best")):
        for name, state in payload.get(group, {}).items():
            f = d / f"{prefix}-{name}.pt"
            torch.save(state, f)
            files[f.name] = f.stat().st_size
    # meta.json is written last and lists every file with its size: a copy cut short (a killed upload to
    # shared storage, a full disk) is recognised as incomplete even when its meta.json arrived
    meta = dict(payload["meta"], schema_version=SCHEMA_VERSION, files=files)
    (d / "meta.json").write_text(json.dumps(meta, indent=1, default=float), encoding="utf-8")
    return d


def _read_complete(d: Path) -> tuple[Optional[dict], Optional[str]]:
    """(meta, None) for a complete checkpoint, else (None, why): meta.json missing or unreadable, no integer
    epoch, or a file it lists missing or of another size than written."""
    try:
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, "no readable meta.json"
    if not isinstance(meta, dict) or not isinstance(meta.get("epoch"), int):
        return None, "meta.json without an integer epoch"
    for name, size in (meta.get("files") or {}).items():
        try:
            actual = (d / name).stat().st_size
        except OSError:
            return None, f"{name} is missing"
        if actual != size:
            return None, f"{name} has {actual} bytes, {size} were written"
    return meta, None


def checkpoint_problem(directory: str | os.PathLike) -> Optional[str]:
    """Why ``directory`` is not a complete checkpoint, or None when it is."""
    return _read_complete(Path(directory))[1]


def complete_epoch(directory: str | os.PathLike) -> Optional[int]:
    """The epoch of a complete checkpoint directory, or None (incomplete, cut short or foreign)."""
    meta, _ = _read_complete(Path(directory))
    return None if meta is None else meta["epoch"]


def load_checkpoint(directory: str | os.PathLike) -> dict:
    """Read a checkpoint directory back into the payload structure."""
    d = Path(directory)
    if not (d / "meta.json").is_file():
        raise DataError(f"{d}: not a neuroimagen checkpoint (no meta.json)")
    meta, problem = _read_complete(d)
    if problem is not None:
        raise DataError(f"{d}: incomplete checkpoint ({problem})")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{d}: checkpoint schema {meta.get('schema_version')} (expected {SCHEMA_VERSION})")
    out: dict[str, Any] = {"meta": meta, "modules": {}, "optimizers": {}, "best": {}}
    for group, prefix in (("modules", "module"), ("optimizers", "optimizer"), ("best", "best")):
        for f in sorted(d.glob(f"{prefix}-*.pt")):
            out[group][f.stem[len(prefix) + 1:]] = torch.load(f, map_location="cpu", weights_only=True)
    return out


def export_model(directory: str | os.PathLike, specs: dict[str, dict], states: dict[str, dict],
                 extra: Optional[dict] = None) -> Path:
    """Write a model directory: ``model.json`` (per module: builder name + kwargs) and weights."""
    with atomic_dir(directory, overwrite=True) as stage:
        for name, state in states.items():
            torch.save(state, stage / f"{name}.pt")
        doc = {"schema_version": SCHEMA_VERSION, "modules": specs, **(extra or {})}
        (stage / "model.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return Path(directory)


def load_model_dir(directory: str | os.PathLike) -> tuple[dict, dict[str, dict]]:
    """(model.json document, {module name: state dict}) of an exported model directory."""
    d = Path(directory)
    spec_path = d / "model.json"
    if not spec_path.is_file():
        raise DataError(f"{d}: not an exported neuroimagen model (no model.json)")
    doc = json.loads(spec_path.read_text(encoding="utf-8"))
    states = {name: torch.load(d / f"{name}.pt", map_location="cpu", weights_only=True) for name in doc["modules"]}
    return doc, states


def state_to_cpu(state: dict) -> dict:
    """A detached, contiguous CPU copy of a (possibly nested) state dict (channels_last weights are saved in
    the ordinary layout, so a checkpoint does not depend on ``train.channels_last``)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True).contiguous()
    if isinstance(state, dict):
        return {k: state_to_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [state_to_cpu(v) for v in state]
    return state
