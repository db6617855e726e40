"""GPU-oriented performance options, checked for correctness on the CPU: bf16 autocast, channels_last,
torch.compile (train.precision / train.channels_last / train.compile) and the attention kernel of the
diffusion model (ldm.attention). Their speed is measured by bench/run.py when a GPU is present."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from neuroimagen.config import load_config
from neuroimagen.errors import ConfigError
from neuroimagen.models.eeg_encoders import cpu_bf16_lstm_supported
from neuroimagen.training.checkpoint import load_model_dir
from neuroimagen.training.context import RunContext, unwrap

pytestmark = pytest.mark.isa  # rerun on a simulated AVX2-only CPU by `make test-avx2`


def _sets(twin) -> list[str]:
    return ["train.backend=local", "train.progress=false", "train.threads_per_worker=2",
            f"data.eeg={twin / 'eeg_5_95_std.pth'}", f"data.splits={twin / 'block_splits_by_image_all.pth'}",
            f"data.images={twin / 'images'}", "data.image_size=32",
            # One encoder epoch: stages 2 and 3 start from the exported encoder, and with two epochs a tie on the
            # validation k-NN (the later epoch is kept) or a near-tie broken by bf16 rounding exports a different
            # epoch in the fp32 and bf16 runs, so their semantic stages would start from different weights.
            "stages.encoder.epochs=1", "stages.encoder.embed_dim=16", "stages.encoder.classes_per_batch=3",
            "stages.encoder.samples_per_class=3",
            # Every triplet active (squared distances of unit rows are <= 4 < margin): the triplet loss is then a
            # smooth mean over a fixed set, so bf16 rounding moves it by rounding error, not by re-mining.
            "stages.encoder.mining=batch_all", "stages.encoder.margin=5.0", "stages.encoder.l2_normalize=true",
            "stages.saliency.epochs=2", "stages.saliency.resolution=32", "stages.saliency.g_width=8",
            "stages.saliency.d_width=8", "stages.saliency.z_dim=16", "stages.saliency.batch_size=8",
            "stages.semantic.epochs=2", "stages.semantic.embed_dim=16", "stages.semantic.hidden=16"]


def _history(run, stage) -> list[dict]:
    return json.loads((run / stage / "history.json").read_text())


# ----------------------------------------------------------------------------------------------
# The run context


def test_autocast_is_bf16_only_when_asked():
    lin = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with RunContext(precision="bf16").autocast():
        assert lin(x).dtype == torch.bfloat16
    with RunContext().autocast():
        assert lin(x).dtype == torch.float32
    with pytest.raises(ValueError, match="precision: expected 'fp32' or 'bf16'"):
        RunContext(precision="fp16")


def test_channels_last_applies_to_image_models_and_batches_only():
    ctx = RunContext(channels_last=True)
    conv = ctx.wrap(nn.Conv2d(3, 4, 3), image=True)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    other = ctx.wrap(nn.Conv2d(3, 4, 3))  # not an image model of the stage: untouched
    assert other.weight.is_contiguous() and not other.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8)
    assert ctx.image_batch(x).is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ctx.image_batch(x), x)  # same values, other layout
    assert RunContext().image_batch(x) is x
    assert ctx.image_batch(torch.randn(2, 5)).is_contiguous()


def test_config_keys_are_strict():
    cfg = load_config(None, ["train.precision=bf16", "train.channels_last=true", "train.compile=true", "ldm.attention=eager"])
    assert (cfg.train.precision, cfg.train.channels_last, cfg.train.compile, cfg.ldm.attention) == ("bf16", True, True, "eager")
    with pytest.raises(ConfigError, match="train.precision: expected one of 'fp32', 'bf16'"):
        load_config(None, ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="ldm.attention: expected one of 'sdpa', 'eager'"):
        load_config(None, ["ldm.attention=flash"])


# ----------------------------------------------------------------------------------------------
# Every stage under each option


@pytest.fixture(scope="module")
def fp32_run(twin, tmp_path_factory):
    from neuroimagen.backends import train

    out = tmp_path_factory.mktemp("fp32") / "r"
    train(load_config(None, _sets(twin)), out, ["encoder", "saliency", "semantic"], log=lambda m: None)
    return out


@pytest.mark.slow
def test_bf16_autocast_trains_every_stage_close_to_fp32(fp32_run, twin, tmp_path):
    from neuroimagen.backends import train

    out = tmp_path / "bf16"
    train(load_config(None, _sets(twin) + ["train.precision=bf16"]), out, ["encoder", "saliency", "semantic"],
          log=lambda m: None)
    # The first epoch starts from the same weights and batches; bf16 keeps 8 mantissa bits (relative rounding
    # 2^-8 = 0.4 % per op), so a smooth epoch-mean loss moves by about a percent whichever kernels the CPU has
    # (native AVX-512 BF16 / AMX, or emulated on AVX2, where the LSTM runs in fp32). Only smooth losses are
    # compared: the encoder's with every triplet active (see _sets), never a loss that depends on a re-mined set.
    for stage, loss in (("encoder", "train_triplet"), ("saliency", "train_g_ssim_loss"), ("semantic", "train_std_mse")):
        a, b = _history(fp32_run, stage), _history(out, stage)
        assert b[0][loss] == pytest.approx(a[0][loss], rel=0.05), (stage, a[0], b[0])
        assert all(torch.isfinite(torch.tensor([h[k] for k in h if k.startswith(("train_", "val_"))])).all() for h in b)
        # weights are still float32 (autocast changes compute, not storage)
        _, states = load_model_dir(out / stage / "model")
        assert all(v.dtype == torch.float32 for s in states.values() for v in s.values() if v.is_floating_point())
    assert all(h["train_active"] == 1.0 for h in _history(out, "encoder") + _history(fp32_run, "encoder"))
    assert _history(out, "saliency")[-1]["val_ssim"] == pytest.approx(_history(fp32_run, "saliency")[-1]["val_ssim"], abs=0.05)


@pytest.mark.slow
def test_channels_last_gives_the_fp32_numbers(fp32_run, twin, tmp_path):
    import shutil

    from neuroimagen.backends import train

    out = tmp_path / "cl"
    out.mkdir()
    # reuse the encoder of the fp32 run so only the saliency stage (the image models) differs
    (out / "run.json").write_text((fp32_run / "run.json").read_text())
    shutil.copytree(fp32_run / "encoder", out / "encoder")
    train(load_config(None, _sets(twin) + ["train.channels_last=true"]), out, ["saliency"], log=lambda m: None)
    a, b = _history(fp32_run, "saliency"), _history(out, "saliency")
    # The same arithmetic in another memory layout, summed in another order by whichever convolution kernels the
    # CPU picks (AVX-512 or AVX2): one step agrees to float rounding (test_channels_last_step_matches_the_plain_layout),
    # but an epoch of GAN feedback amplifies those 1e-7 differences (seen: 1.2e-3 relative on an AVX2-only CPU).
    for epoch, (ha, hb) in enumerate(zip(a, b)):
        for k in ("train_d_hinge", "train_g_total", "val_ssim"):
            assert hb[k] == pytest.approx(ha[k], rel=5e-3 if epoch == 0 else 2e-2, abs=1e-4), (k, ha, hb)
    _, states = load_model_dir(out / "saliency" / "model")
    assert set(states) == {"generator"}
    assert all(v.is_contiguous() for v in states["generator"].values())  # saved in the ordinary layout


@pytest.mark.slow
def test_torch_compile_matches_eager_and_saves_plain_keys(twin, tmp_path):
    from neuroimagen.backends import train

    # dropout off: compiled graphs draw dropout masks from their own generator, so only then are the runs comparable
    sets = _sets(twin) + ["stages.encoder.epochs=1", "stages.encoder.dropout=0.0"]
    train(load_config(None, sets), tmp_path / "eager", ["encoder"], log=lambda m: None)
    train(load_config(None, sets + ["train.compile=true"]), tmp_path / "compiled", ["encoder"], log=lambda m: None)
    a, b = _history(tmp_path / "eager", "encoder"), _history(tmp_path / "compiled", "encoder")
    assert b[0]["train_triplet"] == pytest.approx(a[0]["train_triplet"], rel=1e-3, abs=1e-5), (a, b)
    assert b[0]["val_knn_acc"] == a[0]["val_knn_acc"]
    _, states = load_model_dir(tmp_path / "compiled" / "encoder" / "model")
    assert not any("_orig_mod" in k or k.startswith("module.") for k in states["encoder"])


@pytest.mark.parametrize("name", ["lstm", "channelnet", "tsconv", "generator", "discriminator", "semantic"])
def test_every_trained_model_runs_under_bf16_autocast_close_to_fp32(name):
    """bf16 keeps 8 bits of mantissa: outputs within a few percent of fp32, computed in bf16 where autocast applies."""
    from neuroimagen.models.eeg_encoders import build_encoder
    from neuroimagen.models.saliency_gan import Discriminator, Generator
    from neuroimagen.models.semantic import SemanticRegressor

    torch.manual_seed(0)
    eeg = torch.randn(4, 8, 64)
    if name == "generator":
        model, args = Generator(z_dim=8, cond_dim=6, resolution=32, width=8), (torch.rand(4, 8) * 2 - 1, torch.randn(4, 6))
    elif name == "discriminator":
        model, args = Discriminator(cond_dim=6, resolution=32, width=8), (torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 6))
    elif name == "semantic":
        model = SemanticRegressor(n_chans=8, n_times=64, tokens=5, token_dim=12, embed_dim=16, hidden=16)
        model.set_target_stats(torch.randn(10, 5, 12))
        args = (eeg,)
    else:
        model, args = build_encoder(name, n_chans=8, n_times=64, embed_dim=16), (eeg,)
    model.eval()
    with torch.no_grad():
        ref = model(*args).float()
        with RunContext(precision="bf16").autocast():
            low = model(*args)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    err = float((low.float() - ref).norm() / ref.norm().clamp_min(1e-12))
    assert err < 0.05, err


def test_channels_last_step_matches_the_plain_layout():
    """One forward + backward of G and D with the same weights and inputs: equal in both layouts to float rounding
    on every ISA (the ISA only changes the summation order)."""
    from neuroimagen.models.saliency_gan import Discriminator, Generator

    torch.manual_seed(0)
    z, c, x = torch.rand(4, 8) * 2 - 1, torch.randn(4, 6), torch.rand(4, 3, 32, 32) * 2 - 1
    results = []
    for channels_last in (False, True):
        torch.manual_seed(1)
        g, d = Generator(z_dim=8, cond_dim=6, resolution=32, width=8), Discriminator(cond_dim=6, resolution=32, width=8)
        ctx = RunContext(channels_last=channels_last)
        g, d = ctx.wrap(g, image=True), ctx.wrap(d, image=True)
        loss = d(g(z, c), c).mean() + d(ctx.image_batch(x), c).mean()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for m in (g, d) for p in m.parameters()])
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-5, atol=1e-6)
    assert float((g1 - g0).norm() / g0.norm()) < 1e-4


def test_lstm_runs_under_bf16_on_a_cpu_without_bf16_kernels():
    """An AVX2-only CPU (simulated: oneDNN and ATen limited to AVX2, in a fresh process so the limit takes effect)
    has no bf16 LSTM kernel; train.precision=bf16 must still train the LSTM encoder (its LSTM in fp32)."""
    import subprocess
    import sys

    code = """
import torch
from neuroimagen.models.eeg_encoders import build_encoder, cpu_bf16_lstm_supported
from neuroimagen.training.context import RunContext
torch.manual_seed(0)
m = build_encoder("lstm", n_chans=8, n_times=64, embed_dim=16)
x = torch.randn(4, 8, 64)
with torch.no_grad():
    ref = m(x)
with RunContext(precision="bf16").autocast():
    out = m(x)
out.float().sum().backward()
err = float((out.float() - ref).norm() / ref.norm())
assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
print("supported", cpu_bf16_lstm_supported(), "err", err)
"""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    words = r.stdout.split()
    assert words[:2] == ["supported", "False"], r.stdout  # the probe sees the missing kernel
    assert float(words[3]) < 0.05, r.stdout


@pytest.mark.skipif(not cpu_bf16_lstm_supported(),
                    reason=f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no bf16 LSTM kernel: "
                           "the LSTM runs in fp32 under bf16 autocast here")
def test_lstm_computes_in_bf16_where_the_cpu_has_the_kernel():
    from neuroimagen.models.eeg_encoders import build_encoder

    m = build_encoder("lstm", n_chans=8, n_times=64, embed_dim=16)
    seen = []
    m.lstm.register_forward_hook(lambda mod, inp, out: seen.append(out[0].dtype))
    with RunContext(precision="bf16").autocast():
        m(torch.randn(2, 8, 64))
    assert seen == [torch.bfloat16]


def test_compiled_module_unwraps_to_the_plain_one():
    ctx = RunContext(compile=True)
    plain = nn.Linear(3, 2)
    wrapped = ctx.wrap(plain)
    assert wrapped is not plain and unwrap(wrapped) is plain
    frozen = nn.Linear(3, 2).requires_grad_(False)
    assert ctx.wrap(frozen) is frozen  # nothing to train: left alone


# ----------------------------------------------------------------------------------------------
# Attention kernel of the diffusion model


def test_sdpa_and_eager_attention_agree(tmp_path):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from neuroimagen.models import ldm
    from neuroimagen.models.text_encoder import build_tiny_text_encoder

    torch.manual_seed(0)
    te = build_tiny_text_encoder(seed=0, hidden_size=32, num_layers=1, num_heads=2, max_length=16)
    path = tmp_path / "sd"
    ldm.save_snapshot(path, ldm.build_tiny_vae(16, (8, 16)), ldm.build_tiny_unet(8, te.hidden_size, (16, 32)), te)
    outs = {}
    for kind, proc in (("sdpa", AttnProcessor2_0), ("eager", AttnProcessor)):
        pipe = ldm.load_img2img(str(path), attention=kind)
        procs = list(pipe.unet.attn_processors.values())
        assert procs and all(type(p) is proc for p in procs)
        g = torch.Generator().manual_seed(3)
        emb = torch.randn(2, 16, 32, generator=g)
        outs[kind] = ldm.img2img(pipe, torch.rand(2, 3, 16, 16, generator=g), emb, torch.zeros_like(emb),
                                 seeds=[1, 2], strength=0.8, guidance_scale=3.0, num_inference_steps=4)
    assert torch.allclose(outs["sdpa"], outs["eager"], atol=1e-4)
    with pytest.raises(ConfigError, match="ldm.attention: expected one of sdpa, eager"):
        ldm.load_img2img(str(path), attention="flash")


def test_the_local_reconstruction_loop_uses_the_cpus_it_may_run_on(monkeypatch):
    """`eval.backend: local` takes one torch thread per CPU of the process's affinity mask (taskset, a cgroup
    cpuset, a scheduler's allocation), not every core of the machine: two pinned runs side by side no longer
    oversubscribe the cores."""
    import dataclasses

    import neuroimagen.runs.evaluation as ev
    from neuroimagen.reconstruction.factory import RunSources
    from neuroimagen.training.context import usable_cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert usable_cpus() == 1
    seen = []
    monkeypatch.setattr(ev, "load_reconstruct", lambda cfg, sources: seen.append(sources.threads))
    fields = {f.name: None for f in dataclasses.fields(RunSources) if f.default is dataclasses.MISSING}
    ev.run_local([], load_config(None), RunSources(**fields), on_batch=lambda b: None, progress=False)
    assert seen == [1]
    monkeypatch.delattr(os, "sched_getaffinity")
    assert usable_cpus() == (os.cpu_count() or 1)
