"""Caption embeddings: a CLIP text encoder, either pretrained (Stable Diffusion's) or tiny and built in code.

The semantic stage of NeuroImagen regresses EEG onto the embedding of the seen image's caption: the
``last_hidden_state`` (L, E) of the CLIP text encoder that conditions the latent diffusion model
(77 x 768 for Stable Diffusion 1.5's CLIP ViT-L/14). Captions are tokenised exactly as the Stable
Diffusion pipeline does it (``padding="max_length"``, truncation to L, pad = ``<|endoftext|>``) and
encoded without an attention mask (the pipeline passes none; CLIP's causal mask does the rest).

Two ways to get a :class:`TextEncoder`:

    build_tiny_text_encoder(seed, hidden_size, num_layers, num_heads, max_length)
        a real ``CLIPTokenizer`` over a character-level vocabulary (printable ASCII, no BPE merges)
        and a randomly initialised ``CLIPTextModel``; offline, deterministic per seed (tests, twins).
    load_text_encoder(path)
        a Stable Diffusion snapshot (``tokenizer/`` + ``text_encoder/``), a folder holding a CLIP
        tokenizer and text model directly, or a model id already in the local Hugging Face cache.
        Everything is loaded with ``local_files_only=True``: nothing is ever downloaded.

``TextEncoder.save(path)`` writes the Stable Diffusion layout, which ``load_text_encoder`` reads back.
``TextEncoder.fingerprint`` names the weights themselves (a hash), so that stage-3 models can be matched to
the diffusion model's own text encoder whatever path either was loaded from.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch

from neuroimagen.errors import ConfigError

__all__ = ["TextEncoder", "build_tiny_text_encoder", "load_text_encoder"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also the pad and unk token, as in Stable Diffusion's tokenizer
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_FP16_WEIGHT_FILES = ("model.fp16.safetensors", "model.safetensors.index.fp16.json", "pytorch_model.fp16.bin",
                      "pytorch_model.bin.index.fp16.json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


class TextEncoder:
    """A CLIP tokenizer + ``CLIPTextModel`` pair that turns captions into (L, E) embeddings.

    Attributes:
        tokenizer: a ``transformers.CLIPTokenizer``.
        model: a ``transformers.CLIPTextModel`` in eval mode with ``requires_grad`` off.
        identity: a short stable string naming the encoder, for cache keys: ``tiny-clip-h32-l2-a2-t77-s0``
            for a tiny encoder, the resolved directory for a pretrained one.
    """

    def __init__(self, tokenizer, model, identity: str):
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.identity = str(identity)
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """``sha256:<16 hex>`` of what decides the embeddings: the tokenizer's vocabulary and L, and every
        parameter of the text model (name, dtype, shape, bytes; sorted by name). Two encoders with equal
        fingerprints give equal embeddings, wherever they were loaded from; computed once (~1 s for CLIP-L).
        """
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps({"vocab": sorted(self.tokenizer.get_vocab().items()),
                                           "max_length": self.max_length}).encode())
            for name, p in sorted(self.model.named_parameters()):
                t = p.detach().cpu().contiguous()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = "sha256:" + h.hexdigest()[:16]
        return self._fingerprint

    @property
    def max_length(self) -> int:
        """L: tokens per caption (``tokenizer.model_max_length``, capped at the model's position embeddings)."""
        return int(min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings))

    @property
    def hidden_size(self) -> int:
        """E: size of each token embedding (``model.config.hidden_size``)."""
        return int(self.model.config.hidden_size)

    def __repr__(self) -> str:
        return f"TextEncoder({self.identity!r}, L={self.max_length}, E={self.hidden_size})"

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """captions (N strings) -> input ids (N, L) int64, ``<|startoftext|>`` ... ``<|endoftext|>`` then pad."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("captions: expected a list of strings")
        if len(captions) == 0:
            return torch.zeros(0, self.max_length, dtype=torch.long)
        enc = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        return enc["input_ids"]  # (N, L)

    @torch.no_grad()
    def encode(self, captions: list[str], batch_size: int = 64) -> torch.Tensor:
        """captions (N strings) -> ``last_hidden_state`` (N, L, E) float32 on the CPU, without autograd.

        Batches of ``batch_size`` captions run on the model's device; the result does not depend on
        ``batch_size`` beyond float rounding.
        """
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        ids = self.tokenize(captions)  # (N, L)
        if ids.shape[0] == 0:
            return torch.zeros(0, self.max_length, self.hidden_size)
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, ids.shape[0], int(batch_size)):
            chunk = ids[start:start + int(batch_size)].to(device)  # (b, L)
            hidden = self.model(input_ids=chunk).last_hidden_state  # (b, L, E)
            out.append(hidden.float().cpu())
        return torch.cat(out, dim=0)  # (N, L, E)

    def save(self, path) -> None:
        """Write ``path/tokenizer/`` and ``path/text_encoder/`` (Stable Diffusion snapshot layout).

        Besides ``save_pretrained``'s ``tokenizer.json``, ``tokenizer/`` also gets the classic
        ``vocab.json`` + ``merges.txt`` so that older transformers (slow ``CLIPTokenizer``) can read it.
        """
        root = Path(path)
        tok_dir, enc_dir = root / "tokenizer", root / "text_encoder"
        tok_dir.mkdir(parents=True, exist_ok=True)
        enc_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(tok_dir))
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and type(backend.model).__name__ == "BPE":
            backend.model.save(str(tok_dir))  # vocab.json, merges.txt
        self.model.save_pretrained(str(enc_dir))


# ---------------------------------------------------------------------------------------------------------------
# Tiny, in-code encoder
# ---------------------------------------------------------------------------------------------------------------


def _char_vocab() -> dict[str, int]:
    """Character-level CLIP vocabulary: every printable ASCII character c (33-126) as ``c`` (inside a word)
    and ``c</w>`` (ending a word), then ``<|startoftext|>`` and ``<|endoftext|>``; 190 entries.

    CLIP's byte-level pre-tokeniser maps these bytes to themselves; whitespace only separates words.
    Other characters (non-ASCII) become the unknown token, ``<|endoftext|>``, as in CLIP.
    """
    chars = [chr(i) for i in range(33, 127)]
    tokens = chars + [c + "</w>" for c in chars] + [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}


def _build_char_tokenizer(max_length: int):
    from transformers import CLIPTokenizer

    # transformers 5: CLIPTokenizer(vocab_file=..., merges_file=...) silently ignores the files (the
    # constructor takes in-memory ``vocab``/``merges``); from_pretrained is what reads vocab.json + merges.txt.
    with tempfile.TemporaryDirectory(prefix="tiny-clip-tokenizer-") as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(_char_vocab(), f)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")  # no merges: every word splits into characters
        tokenizer = CLIPTokenizer.from_pretrained(
            tmp, local_files_only=True, model_max_length=max_length,
            bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        )
    tokenizer.name_or_path = "tiny-clip-char"
    return tokenizer


def build_tiny_text_encoder(seed: int = 0, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                            max_length: int = 77) -> TextEncoder:
    """A small real CLIP text encoder, built offline: character-level ``CLIPTokenizer`` (190 tokens) and
    a ``CLIPTextModel`` (hidden ``hidden_size``, MLP ``4 * hidden_size``, ``num_layers`` layers,
    ``num_heads`` heads, ``max_length`` positions) initialised under ``torch.manual_seed(seed)``.

    The global RNG state is restored afterwards. Same seed and sizes -> identical weights and embeddings.
    ``encode`` returns (N, max_length, hidden_size).
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    for name, value in (("hidden_size", hidden_size), ("num_layers", num_layers), ("num_heads", num_heads),
                        ("max_length", max_length)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size: expected a multiple of num_heads={num_heads}, got {hidden_size}")
    if max_length < 2:
        raise ValueError(f"max_length: expected >= 2 (start and end tokens), got {max_length}")

    tokenizer = _build_char_tokenizer(max_length)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    identity = f"tiny-clip-h{hidden_size}-l{num_layers}-a{num_heads}-t{max_length}-s{seed}"
    return TextEncoder(tokenizer=tokenizer, model=model, identity=identity)


# ---------------------------------------------------------------------------------------------------------------
# Pretrained encoder (local directories and the local Hugging Face cache only)
# ---------------------------------------------------------------------------------------------------------------


def _fail(path: str, what: str) -> ConfigError:
    return ConfigError(f"text_encoder.pretrained: {path}: {what}")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache folder of ``repo_id`` (revision ``main``), or None; never downloads."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - not cached, invalid id, or a partial snapshot
        # A partial snapshot (e.g. only tokenizer/ and text_encoder/ of a Stable Diffusion repo were
        # fetched) raises IncompleteSnapshotError, which still names the folder.
        partial = getattr(exc, "snapshot_path", None)
        return Path(partial) if partial and Path(partial).is_dir() else None


def _resolve_dirs(path: str) -> tuple[Path, Path, Path]:
    """path -> (root, tokenizer dir, text encoder dir), or ConfigError."""
    expected = ("expected a Stable Diffusion snapshot directory (tokenizer/ and text_encoder/) or a directory "
                "holding a CLIP tokenizer and CLIPTextModel")
    p = Path(path).expanduser()
    if p.is_dir():
        root = p
    elif p.exists():
        raise _fail(path, f"is a file; {expected}")
    elif _REPO_ID.match(path) and ".." not in path and "--" not in path:
        root = _cached_snapshot(path)
        if root is None:
            raise _fail(path, f"not a local directory and not in the local Hugging Face cache (nothing is "
                              f"downloaded); {expected}, or the id of a model already cached")
    else:
        raise _fail(path, f"no such directory; {expected}")
    root = root.resolve()
    if (root / "tokenizer").is_dir() and (root / "text_encoder").is_dir():
        return root, root / "tokenizer", root / "text_encoder"
    if (root / "config.json").is_file():
        return root, root, root
    raise _fail(path, f"found neither tokenizer/ + text_encoder/ nor config.json; {expected}")


def load_text_encoder(path: str) -> TextEncoder:
    """Load a pretrained CLIP text encoder from local files only (``local_files_only=True``).

    ``path`` is a Stable Diffusion snapshot directory (``tokenizer/`` and ``text_encoder/``, e.g. one
    written by :meth:`TextEncoder.save`), a directory holding a CLIP tokenizer and ``CLIPTextModel``
    (or full ``CLIPModel``) directly, or a model id such as ``runwayml/stable-diffusion-v1-5`` that is
    already in the local Hugging Face cache. The model is loaded in float32 (fp16-only folders too).
    Anything missing or unreadable raises ``ConfigError("text_encoder.pretrained: <path>: ...")``.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    path = os.fspath(path)
    root, tok_dir, enc_dir = _resolve_dirs(path)
    # transformers 5 "loads" a CLIPTokenizer from a folder without vocabulary files (a 2-token default
    # vocabulary), so the files are checked first.
    if not ((tok_dir / "tokenizer.json").is_file()
            or ((tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file())):
        raise _fail(path, f"no CLIP tokenizer in {tok_dir} (expected tokenizer.json, or vocab.json and merges.txt)")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the folder is not a CLIP tokenizer
        raise _fail(path, f"cannot load a CLIP tokenizer from {tok_dir} ({_short(exc)})") from exc

    kwargs: dict = {}
    if not any((enc_dir / f).is_file() for f in _WEIGHT_FILES) and any(
            (enc_dir / f).is_file() for f in _FP16_WEIGHT_FILES):
        kwargs["variant"] = "fp16"
    try:
        model, info = CLIPTextModel.from_pretrained(str(enc_dir), local_files_only=True, dtype=torch.float32,
                                                    output_loading_info=True, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise _fail(path, f"cannot load a CLIPTextModel from {enc_dir} ({_short(exc)})") from exc
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        raise _fail(path, f"{enc_dir} does not hold CLIP text-model weights "
                          f"({len(missing)} missing, e.g. {sorted(missing)[0]})")
    if len(tokenizer) > model.config.vocab_size:
        raise _fail(path, f"tokenizer has {len(tokenizer)} tokens but the text model only {model.config.vocab_size}")
    return TextEncoder(tokenizer=tokenizer, model=model.float(), identity=str(root))
