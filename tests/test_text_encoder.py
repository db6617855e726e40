"""Caption embeddings: the tiny in-code CLIP text encoder, the snapshot layout, and offline loading."""

from __future__ import annotations

import json

import pytest
import torch

from neuroimagen.errors import ConfigError
from neuroimagen.models.text_encoder import TextEncoder, build_tiny_text_encoder, load_text_encoder

CAPTION = "An image of airliner"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """Belt and braces: no test may reach the Hugging Face hub, and the HF cache is an empty folder."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))


@pytest.fixture(scope="module")
def tiny() -> TextEncoder:
    return build_tiny_text_encoder(seed=0)


def test_tokenizer_round_trip(tiny):
    tok = tiny.tokenizer
    assert type(tok).__name__ == "CLIPTokenizer"
    assert len(tok) == 2 * 94 + 2  # printable ASCII as c and c</w>, plus start/end
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok.bos_token == "<|startoftext|>"
    assert tiny.max_length == tok.model_max_length == 77
    ids = tiny.tokenize([CAPTION])[0].tolist()
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id
    n_chars = len(CAPTION.replace(" ", ""))  # character-level: one token per non-space character
    assert tok.bos_token_id not in ids[1:]
    assert ids[1 + n_chars] == tok.eos_token_id
    assert ids[2 + n_chars:] == [tok.pad_token_id] * (77 - 2 - n_chars)
    pieces = tok.convert_ids_to_tokens(ids[1:1 + n_chars])
    assert pieces[:3] == ["a", "n</w>", "i"]  # lower-cased, word ends marked </w>
    assert tok.decode(ids, skip_special_tokens=True) == CAPTION.lower()
    # The same ids come straight from the tokenizer with Stable Diffusion's call.
    sd = tok([CAPTION], padding="max_length", max_length=tok.model_max_length, truncation=True)
    assert sd["input_ids"][0] == ids


def test_truncation_keeps_end_token():
    enc = build_tiny_text_encoder(seed=0, max_length=12)
    ids = enc.tokenize(["a very long caption that does not fit"])[0].tolist()
    assert len(ids) == 12
    assert ids[0] == enc.tokenizer.bos_token_id and ids[-1] == enc.tokenizer.eos_token_id
    assert enc.encode(["a very long caption that does not fit"]).shape == (1, 12, 32)


def test_encode_shape_dtype_and_no_grad(tiny):
    out = tiny.encode([CAPTION, "An image of a dog", "x"])
    assert out.shape == (3, tiny.max_length, tiny.hidden_size) == (3, 77, 32)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert not out.requires_grad
    assert torch.isfinite(out).all()
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert tiny.encode([]).shape == (0, 77, 32)
    with pytest.raises(TypeError):
        tiny.encode(CAPTION)  # a bare string is not a list of captions


def test_captions_give_distinct_embeddings(tiny):
    out = tiny.encode([CAPTION, "An image of a dog", CAPTION])
    assert torch.equal(out[0], out[2])
    assert (out[0] - out[1]).abs().max() > 1e-3
    # Batching does not change the result.
    captions = [CAPTION, "An image of a dog", "a", "bb ccc"]
    assert torch.allclose(tiny.encode(captions, batch_size=1), tiny.encode(captions, batch_size=64), atol=1e-5)


def test_deterministic_per_seed_and_rng_untouched(tiny):
    state = torch.random.get_rng_state()
    again = build_tiny_text_encoder(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # building does not consume global randomness
    other = build_tiny_text_encoder(seed=1)
    ref = tiny.encode([CAPTION])
    assert torch.equal(again.encode([CAPTION]), ref)
    assert (other.encode([CAPTION]) - ref).abs().max() > 1e-3
    assert again.identity == tiny.identity == "tiny-clip-h32-l2-a2-t77-s0"
    assert other.identity != tiny.identity
    assert build_tiny_text_encoder(seed=0, num_heads=4).identity != tiny.identity


def test_tiny_sizes():
    enc = build_tiny_text_encoder(seed=0, hidden_size=16, num_layers=1, num_heads=4, max_length=20)
    cfg = enc.model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (16, 64, 1, 4)
    assert cfg.max_position_embeddings == 20 and enc.max_length == 20
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        enc.tokenizer.bos_token_id, enc.tokenizer.eos_token_id, enc.tokenizer.pad_token_id)
    assert enc.encode(["hi"]).shape == (1, 20, 16)
    with pytest.raises(ValueError, match="num_heads"):
        build_tiny_text_encoder(hidden_size=30, num_heads=4)


def test_save_then_load_snapshot_layout(tiny, tmp_path):
    root = tmp_path / "snapshot"
    tiny.save(root)
    assert (root / "tokenizer" / "tokenizer_config.json").is_file()
    assert (root / "tokenizer" / "vocab.json").is_file() and (root / "tokenizer" / "merges.txt").is_file()
    assert (root / "text_encoder" / "config.json").is_file()
    loaded = load_text_encoder(str(root))
    assert loaded.identity == str(root.resolve())
    assert (loaded.max_length, loaded.hidden_size) == (77, 32)
    assert loaded.tokenize([CAPTION]).tolist() == tiny.tokenize([CAPTION]).tolist()
    captions = [CAPTION, "An image of a dog"]
    assert torch.equal(loaded.encode(captions), tiny.encode(captions))
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    assert next(loaded.model.parameters()).dtype == torch.float32


def test_fingerprint_names_the_weights_not_the_path(tiny, tmp_path):
    tiny.save(tmp_path / "a")
    loaded = load_text_encoder(str(tmp_path / "a"))
    assert loaded.identity != tiny.identity and loaded.fingerprint == tiny.fingerprint  # same weights, other path
    assert tiny.fingerprint.startswith("sha256:") and len(tiny.fingerprint) == 7 + 16
    other = build_tiny_text_encoder(seed=1)  # same shapes, other weights
    assert other.encode([CAPTION]).shape == tiny.encode([CAPTION]).shape and other.fingerprint != tiny.fingerprint
    with torch.no_grad():
        next(loaded.model.parameters())[0, 0] += 1e-3
    loaded._fingerprint = None
    assert loaded.fingerprint != tiny.fingerprint  # one changed weight changes it


def test_load_flat_directory(tiny, tmp_path):
    flat = tmp_path / "clip"
    tiny.tokenizer.save_pretrained(str(flat))
    tiny.model.save_pretrained(str(flat))
    loaded = load_text_encoder(flat)  # a PathLike works too
    assert torch.equal(loaded.encode([CAPTION]), tiny.encode([CAPTION]))


def test_load_from_local_hf_cache(tiny, tmp_path, monkeypatch):
    """A model id resolves through the local cache only (models--org--name/refs/main -> snapshots/<hash>)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "cache"
    repo = cache / "models--someorg--tiny-sd"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    tiny.save(repo / "snapshots" / commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    loaded = load_text_encoder("someorg/tiny-sd")
    assert commit in loaded.identity
    assert torch.equal(loaded.encode([CAPTION]), tiny.encode([CAPTION]))


@pytest.mark.parametrize("bad", ["missing-dir", "runwayml/stable-diffusion-v1-5", "someorg/not-cached"])
def test_missing_path_or_uncached_id_raises(tmp_path, bad):
    path = str(tmp_path / "does" / "not" / "exist") if bad == "missing-dir" else bad
    with pytest.raises(ConfigError) as info:
        load_text_encoder(path)
    msg = str(info.value)
    assert msg.startswith(f"text_encoder.pretrained: {path}: ")
    assert "\n" not in msg


def test_invalid_directories_raise(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="tokenizer/"):
        load_text_encoder(str(empty))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        load_text_encoder(str(a_file))
    # Right layout, wrong contents.
    broken = tmp_path / "broken"
    (broken / "tokenizer").mkdir(parents=True)
    (broken / "text_encoder").mkdir()
    (broken / "text_encoder" / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    with pytest.raises(ConfigError, match="no CLIP tokenizer") as info:
        load_text_encoder(str(broken))
    assert str(info.value).startswith(f"text_encoder.pretrained: {broken}: ")
    # A usable tokenizer but a config-only text encoder (no weights).
    build_tiny_text_encoder(seed=0).tokenizer.save_pretrained(str(broken / "tokenizer"))
    with pytest.raises(ConfigError, match="cannot load a CLIPTextModel"):
        load_text_encoder(str(broken))


def test_mismatched_weights_raise(tiny, tmp_path):
    root = tmp_path / "snap"
    tiny.save(root)
    config_path = root / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_hidden_layers"] = 3  # the checkpoint only holds 2 layers: layer 3 would be random
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="does not hold CLIP text-model weights"):
        load_text_encoder(str(root))
