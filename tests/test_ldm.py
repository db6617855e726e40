"""Stage 4's latent diffusion with tiny components on the CPU: the snapshot loader (offline), the img2img and
text-to-image calls, per-image seeding, and the tiny LDM's training."""

from __future__ import annotations

import json

import pytest
import torch

from neuroimagen.config import LDMConfig
from neuroimagen.errors import ConfigError
from neuroimagen.frozen.ldm import train_tiny_ldm
from neuroimagen.models import ldm
from neuroimagen.models.text_encoder import build_tiny_text_encoder

R = 16  # pixels; VAE halves once -> 8x8 latents, UNet halves once more


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A directory laid out like a Stable Diffusion snapshot, written with save_pretrained from tiny parts."""
    torch.manual_seed(0)
    te = build_tiny_text_encoder(seed=0, hidden_size=32, num_layers=1, num_heads=2, max_length=16)
    vae = ldm.build_tiny_vae(R, (8, 16))
    unet = ldm.build_tiny_unet(R // 2, te.hidden_size, (16, 32))
    path = tmp_path_factory.mktemp("sd") / "tiny-sd"
    ldm.save_snapshot(path, vae, unet, te, extra={"note": "test"})
    return path


@pytest.fixture(scope="module")
def pipe(snapshot):
    return ldm.load_img2img(str(snapshot))


def test_snapshot_has_the_stable_diffusion_layout(snapshot):
    for part in ("model_index.json", "vae/config.json", "unet/config.json", "text_encoder/config.json",
                 "tokenizer/vocab.json", "scheduler/scheduler_config.json"):
        assert (snapshot / part).is_file(), part
    index = json.loads((snapshot / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionImg2ImgPipeline" and index["unet"][1] == "UNet2DConditionModel"


def test_real_path_loader_reads_the_snapshot_offline(pipe, snapshot, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert type(pipe).__name__ == "StableDiffusionImg2ImgPipeline"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.steps_offset == 1
    assert ldm.pipeline_resolution(pipe) == R == ldm.snapshot_resolution(str(snapshot))
    assert pipe.safety_checker is None


def test_a_saved_snapshot_keeps_the_text_encoder_fingerprint(snapshot, pipe):
    """Stage 3 records the run's text encoder by fingerprint; the tiny LDM's snapshot must carry the same one, or
    reconstruction would refuse its own regressors (neuroimagen.reconstruction.factory.check_text_encoder)."""
    from neuroimagen.models.text_encoder import TextEncoder, load_text_encoder

    te = build_tiny_text_encoder(seed=0, hidden_size=32, num_layers=1, num_heads=2, max_length=16)
    assert load_text_encoder(str(snapshot)).fingerprint == te.fingerprint
    assert TextEncoder(pipe.tokenizer, pipe.text_encoder, identity="pipe").fingerprint == te.fingerprint


def _embeds(pipe, b, seed):
    g = torch.Generator().manual_seed(seed)
    L, E = pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size
    return torch.randn(b, L, E, generator=g)


def test_img2img_output_shape_range_and_that_prompt_embeds_change_it(pipe):
    init = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))  # upsampled to R inside
    neg = torch.zeros_like(_embeds(pipe, 2, 0))
    kw = dict(seeds=[5, 6], strength=0.8, guidance_scale=3.0, num_inference_steps=4)
    a = ldm.img2img(pipe, init, _embeds(pipe, 2, 0), neg, **kw)
    b = ldm.img2img(pipe, init, _embeds(pipe, 2, 1), neg, **kw)
    assert a.shape == (2, 3, R, R) and a.dtype == torch.float32
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert (a - b).abs().max() > 1e-3  # the prompt embedding steers the denoiser
    again = ldm.img2img(pipe, init, _embeds(pipe, 2, 0), neg, **kw)
    assert torch.equal(a, again)  # seeded: identical


def test_each_image_depends_on_its_own_seed_not_on_its_batch(pipe):
    init = torch.rand(3, 3, R, R, generator=torch.Generator().manual_seed(2))
    h = _embeds(pipe, 3, 4)
    neg = torch.zeros_like(h)
    kw = dict(strength=0.7, guidance_scale=2.0, num_inference_steps=4)
    batch = ldm.img2img(pipe, init, h, neg, seeds=[10, 11, 12], **kw)
    alone = ldm.img2img(pipe, init[1:2], h[1:2], neg[1:2], seeds=[11], **kw)
    assert torch.allclose(batch[1:2], alone, atol=1e-4)
    other = ldm.img2img(pipe, init[1:2], h[1:2], neg[1:2], seeds=[99], **kw)
    assert (other - alone).abs().max() > 1e-3


def test_text2img_from_pure_noise_shares_the_components(pipe):
    t2i = ldm.text2img_from(pipe)
    assert t2i.unet is pipe.unet and t2i.vae is pipe.vae
    h = _embeds(pipe, 2, 3)
    out = ldm.text2img(t2i, h, torch.zeros_like(h), seeds=[1, 2], guidance_scale=2.0, num_inference_steps=3)
    assert out.shape == (2, 3, R, R)
    assert (out[0] - out[1]).abs().max() > 1e-4


@pytest.mark.parametrize("layout", ["missing", "file", "partial", "uncached-id"])
def test_bad_snapshot_paths_are_one_line_config_errors(tmp_path, layout, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if layout == "missing":
        path, frag = str(tmp_path / "nope" / "sd"), "no such directory"
    elif layout == "file":
        (tmp_path / "f").write_text("x")
        path, frag = str(tmp_path / "f"), "is a file"
    elif layout == "partial":
        (tmp_path / "sd" / "unet").mkdir(parents=True)
        (tmp_path / "sd" / "model_index.json").write_text("{}")
        path, frag = str(tmp_path / "sd"), "missing vae"
    else:
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        path, frag = "nobody/no-such-model", "not in the local Hugging Face cache"
    with pytest.raises(ConfigError) as exc:
        ldm.load_img2img(path)
    msg = str(exc.value)
    assert msg.startswith("ldm.pretrained: ") and frag in msg and "\n" not in msg


def test_unloadable_weights_are_a_config_error(snapshot, tmp_path):
    import shutil

    bad = tmp_path / "sd"
    shutil.copytree(snapshot, bad)
    for f in (bad / "unet").glob("*.safetensors"):
        f.write_bytes(b"truncated")
    with pytest.raises(ConfigError, match="cannot load a Stable Diffusion img2img pipeline"):
        ldm.load_img2img(str(bad))


def test_tiny_ldm_training_learns_and_its_snapshot_loads(tmp_path):
    """A few steps on coloured squares: the VAE reconstructs better than its start, the UNet's epsilon error
    falls well below 1 (predicting nothing), and the saved snapshot goes through the real-path loader."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.full((8, 3, R, R), 0.5)
    for i in range(8):
        c = torch.rand(3, generator=g)
        imgs[i, :, 4:12, 4:12] = c.view(3, 1, 1)
    te = build_tiny_text_encoder(seed=0, hidden_size=32, num_layers=1, num_heads=2, max_length=16)
    caps = te.encode([f"square {i}" for i in range(8)])
    lc = LDMConfig(resolution=R, vae_channels=(8, 16), unet_channels=(16, 32), vae_steps=40, unet_steps=60,
                   train_batch_size=8, lr=2e-3)
    res = train_tiny_ldm(imgs, [caps], te.encode([""])[0], lc, progress=False, log=lambda m: None)
    h = res["history"]
    assert sum(h["vae"][-5:]) / 5 < sum(h["vae"][:5]) / 5
    assert sum(h["unet"][-10:]) / 10 < 0.5
    assert res["vae"].config.scaling_factor > 0
    path = ldm.save_snapshot(tmp_path / "tiny", res["vae"], res["unet"], te, extra={"k": 1})
    pipe = ldm.load_img2img(str(path))
    out = ldm.img2img(pipe, imgs[:2], caps[:2], te.encode(["", ""]), seeds=[0, 1], strength=0.5,
                      guidance_scale=2.0, num_inference_steps=4)
    assert out.shape == (2, 3, R, R)


def test_ldm_config_checks_divisibility_and_text_encoder_pairing():
    from neuroimagen.config import load_config

    with pytest.raises(ConfigError, match="ldm.resolution: 30 must be divisible"):
        load_config(None, ["ldm.resolution=30"])
    with pytest.raises(ConfigError, match="text_encoder.pretrained: null, but ldm.pretrained is set"):
        load_config(None, ["ldm.pretrained=/somewhere/sd"])
