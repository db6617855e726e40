"""Stage 4 composed from tiny components built in code (no run directory, no demo): Decode -> Generate ->
Score on a handful of rows, with the output shapes, the columns, and a fixed slice of the numbers for a
fixed seed (the diffusers pattern: dummy components, expected output slice)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from neuroimagen.config import Config, VariantConfig
from neuroimagen.errors import ConfigError
from neuroimagen.metrics.nway import n_way_top_k_hits
from neuroimagen.models.classifier import Classifier
from neuroimagen.models import ldm
from neuroimagen.models.eeg_encoders import build_encoder
from neuroimagen.models.saliency_gan import Generator
from neuroimagen.models.semantic import SemanticRegressor
from neuroimagen.models.text_encoder import build_tiny_text_encoder
from neuroimagen.reconstruction.decode import Decode
from neuroimagen.reconstruction.generate import Generate
from neuroimagen.reconstruction.images import PngWriter, save_png
from neuroimagen.reconstruction.reconstruct import Reconstruct
from neuroimagen.reconstruction.rows import build_rows, row_seeds, rows_to_batch, select_variants
from neuroimagen.reconstruction.score import KEEP, Score

C, T = 8, 64  # EEG channels, samples
SAL = 32  # saliency resolution (the generator's smallest)
R = 16  # diffusion resolution: the VAE halves once, the UNet once more
K = 4  # classes
VARIANTS = (VariantConfig("L+I", "saliency", "label", "own"), VariantConfig("I", "saliency", "none", "own"),
            VariantConfig("L", "noise", "label", "own"), VariantConfig("oracle", "gt", "true_label", "own"))


def _pipeline(te):
    """An img2img pipeline assembled in memory from tiny components (as ``ldm.save_snapshot`` assembles one)."""
    from diffusers import StableDiffusionImg2ImgPipeline  # heavy: imported by the test that needs it

    torch.manual_seed(0)
    vae, unet = ldm.build_tiny_vae(R, (8, 16)), ldm.build_tiny_unet(R // 2, te.hidden_size, (16, 32))
    pipe = StableDiffusionImg2ImgPipeline(vae=vae.eval(), text_encoder=te.model, tokenizer=te.tokenizer,
                                          unet=unet.eval(), scheduler=ldm.ddim_scheduler(), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Tiny stage 1-3 modules, a tiny pipeline and classifier sharing one text encoder, EEG, GT images, rows."""
    root = tmp_path_factory.mktemp("gt")
    te = build_tiny_text_encoder(seed=0, hidden_size=32, num_layers=1, num_heads=2, max_length=16)
    torch.manual_seed(0)
    encoder = build_encoder("tsconv", C, T, 16, width=8).eval()
    generator = Generator(z_dim=8, cond_dim=16, resolution=SAL, width=8).eval()
    regressor = SemanticRegressor(C, T, te.max_length, te.hidden_size, embed_dim=16, width=8, hidden=32).eval()
    net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(3 * 4 * 4, K))  # (B, 3, S, S) -> (B, K)
    clf = Classifier(net, num_classes=K, input_size=16, identity="test-linear", kind="judge", mean=(0.5, 0.5, 0.5),
                     std=(0.1, 0.1, 0.1))
    g = torch.Generator().manual_seed(1)
    eeg = torch.randn(3, C, T, generator=g)  # three trials
    gts = []
    for j in range(3):
        path = root / f"img{j}.png"
        save_png(torch.rand(3, 24, 24, generator=g), path)
        gts.append(str(path))
    rows = [{"subject": "1", "variant": v.name, "item": j, "eeg_item": j, "sample": 0, **row_seeds(0, j, 0),
             "stem": f"img{j}", "label": j, "class_name": f"class {j}", "gt": gts[j], "init_kind": v.init,
             "semantics": v.semantics, "eeg_source": v.eeg} for v in VARIANTS for j in (0, 2)]
    decode = Decode(segment=lambda j: eeg[j], text=te, z_dim=8, resolution=SAL, encoder=encoder, generator=generator,
                    regressors={"label": regressor})
    pipe = _pipeline(te)
    generate = Generate(pipe, te.encode([""])[0], strength=0.75, guidance_scale=3.0, num_inference_steps=4)
    return {"decode": decode, "generate": generate, "clf": clf, "rows": rows, "te": te, "root": root, "gts": gts}


def _score(parts, write_image=None):
    return Score(parts["clf"], n_way=3, top_k=1, trials=20, ssim_convention="dreamdiffusion", ssim_resolution=None,
                 write_image=write_image)


@pytest.fixture(scope="module")
def staged(parts, tmp_path_factory):
    """The rows through Decode, Generate and Score one after the other, the PNGs written under ``root``."""
    root = tmp_path_factory.mktemp("run")
    decoded = parts["decode"](rows_to_batch(parts["rows"]))
    generated = parts["generate"](decoded)
    scored = _score(parts, PngWriter(root))(generated)
    return decoded, generated, scored, root


def test_decode_generate_score_composed_from_tiny_components(parts, staged):
    rows = parts["rows"]
    decoded, generated, scored, root = staged
    B = len(rows)
    assert decoded["init"].shape == (B, 3, SAL, SAL) and decoded["prompt"].shape == (B, 16, 32)
    assert list(decoded["init_kind"]) == [r["init_kind"] for r in rows]
    by = {(r["variant"], r["item"]): i for i, r in enumerate(rows)}
    assert np.all(decoded["init"][by[("L", 0)]] == 0)  # pure noise: no init image
    assert np.allclose(decoded["prompt"][by[("I", 0)]], parts["te"].encode([""])[0].numpy())  # empty caption
    # the same trial's saliency map, whatever the variant: z is seeded by the trial
    np.testing.assert_array_equal(decoded["init"][by[("L+I", 2)]], decoded["init"][by[("I", 2)]])

    assert generated["image"].shape == (B, 3, R, R) and "prompt" not in generated
    assert generated["image"].min() >= 0 and generated["image"].max() <= 1

    assert set(scored) == set(KEEP) | {"judge_gt_top1", "judge_top1", "acc_hit", "acc_n", "ssim", "probs", "image",
                                       "saliency"}
    assert scored["probs"].shape == (B, K) and np.allclose(scored["probs"].sum(1), 1, atol=1e-5)
    assert (scored["acc_n"] == 3).all() and ((scored["acc_hit"] >= 0) & (scored["acc_hit"] <= 1)).all()
    assert scored["image"][0] == "results/images/s1/L+I/img0-0-0.png"
    assert scored["saliency"][by[("L", 0)]] == "" and scored["saliency"][0] == "results/images/s1/L+I/img0-0-0-init.png"
    assert (root / scored["image"][0]).is_file() and (root / scored["saliency"][0]).is_file()

    # a fixed slice of the numbers for seed 0
    np.testing.assert_allclose(generated["image"][0, :, 8, 4:7].ravel(), EXPECTED_IMAGE_SLICE, atol=1e-4)
    np.testing.assert_allclose(scored["ssim"], EXPECTED_SSIM, atol=1e-4)
    np.testing.assert_allclose(scored["probs"][:, 0], EXPECTED_PROB0, atol=1e-4)
    np.testing.assert_allclose(scored["acc_hit"], EXPECTED_ACC, atol=1e-6)
    assert list(scored["judge_top1"]) == [2, 0, 2, 0, 2, 2, 2, 2] and list(scored["judge_gt_top1"]) == [1, 2] * 4


def test_reconstruct_is_the_three_in_a_row_and_score_needs_no_image_writer(parts, staged, tmp_path, monkeypatch):
    _, _, scored, _ = staged
    monkeypatch.chdir(tmp_path)
    fused = Reconstruct(parts["decode"], parts["generate"], _score(parts))(rows_to_batch(parts["rows"]))
    assert list(fused["image"]) == list(scored["image"])  # the paths are still named...
    assert not any(tmp_path.iterdir())  # ...and nothing is written
    np.testing.assert_allclose(fused["ssim"], scored["ssim"], atol=1e-6)
    np.testing.assert_allclose(fused["probs"], scored["probs"], atol=1e-6)
    assert list(fused["acc_hit"]) == list(scored["acc_hit"])


def test_score_scores_the_is_network_beside_the_classifier_in_the_same_pass(parts, staged):
    _, generated, scored, _ = staged
    torch.manual_seed(3)
    net = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, 7))  # another label space
    is_net = Classifier(net, num_classes=7, input_size=12, resize_size=14, identity="test-is", kind="inception")
    both = Score(parts["clf"], n_way=3, top_k=1, trials=20, ssim_convention="dreamdiffusion", ssim_resolution=None,
                 is_network=is_net)(generated)
    assert set(both) == set(scored) | {"is_probs"}
    expected = is_net.probs(torch.from_numpy(np.asarray(generated["image"], dtype=np.float32)))
    assert both["is_probs"].shape == (len(parts["rows"]), 7) and both["is_probs"].dtype == np.float32
    np.testing.assert_allclose(both["is_probs"], expected.numpy(), atol=1e-6)
    np.testing.assert_allclose(both["probs"], scored["probs"], atol=1e-6)  # the ACC classifier is untouched
    assert list(both["acc_hit"]) == list(scored["acc_hit"])


def test_a_row_needing_a_missing_component_is_one_clear_error(parts):
    row = dict(parts["rows"][0], semantics="image", variant="B+I")
    with pytest.raises(ConfigError, match="variant 'B\\+I': 'image' semantics need the stage-3 'image' regressor"):
        parts["decode"](rows_to_batch([row]))


# -- seeds: one saliency map per EEG trial, one seed per purpose ---------------------------------------------------

SEED_VARIANTS = (VariantConfig("L+I", "saliency", "label", "own"), VariantConfig("L+I copy", "saliency", "label", "own"),
                 VariantConfig("I", "saliency", "none", "own"), VariantConfig("other-class", "saliency", "label",
                                                                               "other_class"))


def _seed_rows(parts, seed: int = 0, trials: int = 2) -> list[dict]:
    """build_rows over a three-trial recording (the fixture's EEG and GT images): ``trials`` trials x 3 samples x
    SEED_VARIANTS."""
    ec = dataclasses.replace(Config().eval, definitions=SEED_VARIANTS, variants=tuple(v.name for v in SEED_VARIANTS),
                             max_trials=trials)
    cfg = dataclasses.replace(Config(), seed=seed, eval=ec)
    rec = SimpleNamespace(source="three trials", splits={"test": np.arange(3)}, subjects=np.ones(3, dtype=int),
                          labels=np.arange(3), stems=[f"img{j}" for j in range(3)],
                          class_names=[f"class {j}" for j in range(3)], image_paths=parts["gts"])
    assert cfg.ldm.samples_per_eeg == 3
    return build_rows(cfg, rec, ec.variants)


def test_each_row_has_one_seed_per_purpose_that_collides_with_no_other():
    z, noise, nway, mismatch = set(), set(), set(), set()
    for j in range(200):
        for k in range(3):
            s = row_seeds(0, j, k)
            assert len(set(s.values())) == 4  # four purposes, four streams
            assert all(0 <= v < 2**63 for v in s.values())  # int64 columns, torch manual_seed
            assert s["seed_z"] == row_seeds(0, j, 0)["seed_z"]  # z: one per trial
            z.add(s["seed_z"])
            noise.add(s["seed_noise"])
            nway.add(s["seed_nway"])
            assert s["seed_mismatch"] == row_seeds(0, j, 0)["seed_mismatch"]  # the mismatched GT: one per trial
            mismatch.add(s["seed_mismatch"])
    assert len(z) == len(mismatch) == 200 and len(noise) == len(nway) == 600
    assert len(z | noise | nway | mismatch) == 1600
    assert row_seeds(1, 5, 2) != row_seeds(0, 5, 2)
    torch.Generator().manual_seed(max(z | noise | nway))


def test_rows_carry_the_seeds_of_their_trial_and_sample_whatever_the_variant(parts):
    rows = _seed_rows(parts)
    assert len(rows) == len(SEED_VARIANTS) * 2 * 3
    for r in rows:
        assert {k: r[k] for k in ("seed_z", "seed_noise", "seed_nway", "seed_mismatch")} == row_seeds(0, r["item"],
                                                                                                      r["sample"])
        assert "seed" not in r
    other = {r["item"]: r["eeg_item"] for r in rows if r["variant"] == "other-class"}
    assert all(e != j for j, e in other.items())


def test_every_sample_of_a_trial_gets_the_same_saliency_map_and_its_own_diffusion_noise(parts):
    rows = _seed_rows(parts)
    decoded = parts["decode"](rows_to_batch(rows))
    init = {(r["variant"], r["item"], r["sample"]): decoded["init"][i] for i, r in enumerate(rows)}
    for (v, j, k), x in init.items():
        np.testing.assert_array_equal(x, init[(v, j, 0)])  # one saliency map per EEG trial...
        if v != "other-class":
            np.testing.assert_array_equal(x, init[("L+I", j, 0)])  # ...in every variant fed that EEG
    assert np.abs(init[("L+I", 0, 0)] - init[("L+I", 1, 0)]).max() > 1e-3  # trials differ
    assert not np.array_equal(init[("other-class", 0, 0)], init[("L+I", 0, 0)])  # another EEG (untrained G: close)

    sel = [i for i, r in enumerate(rows) if r["variant"] in ("L+I", "L+I copy") and r["item"] == 0]
    images = parts["generate"]({k: v[sel] for k, v in decoded.items()})["image"]
    img = {(rows[i]["variant"], rows[i]["sample"]): images[n] for n, i in enumerate(sel)}
    for k in range(3):  # the same definition under two names: the same noise, the same image
        np.testing.assert_allclose(img[("L+I copy", k)], img[("L+I", k)], atol=1e-6)
    for a, b in ((0, 1), (0, 2), (1, 2)):  # one init image, one prompt: the samples differ by their noise alone
        assert np.abs(img[("L+I", a)] - img[("L+I", b)]).max() > 1e-2


def test_row_values_do_not_depend_on_the_batch_and_distractors_follow_seed_nway(parts):
    rows = [r for r in _seed_rows(parts) if r["variant"] in ("L+I", "other-class")]
    score = _score(parts)

    def run(batch_rows):
        return score(parts["generate"](parts["decode"](rows_to_batch(batch_rows))))

    whole = run(rows)
    order = list(range(len(rows)))[::-1]
    parts_out = [run([rows[i] for i in order[:5]]), run([rows[i] for i in order[5:]])]  # reversed, split 5 | 7
    alone = {c: np.concatenate([p[c] for p in parts_out])[np.argsort(order)] for c in ("ssim", "probs", "acc_hit")}
    np.testing.assert_allclose(alone["ssim"], whole["ssim"], atol=1e-5)
    np.testing.assert_allclose(alone["probs"], whole["probs"], atol=1e-5)
    np.testing.assert_array_equal(alone["acc_hit"], whole["acc_hit"])
    # the N-way draws come from seed_nway alone (an independent computation of the hit rate)
    for i, r in enumerate(rows):
        g = torch.Generator().manual_seed(r["seed_nway"])
        ref = n_way_top_k_hits(torch.from_numpy(whole["probs"][i: i + 1]),
                               torch.from_numpy(whole["judge_gt_top1"][i: i + 1]), n=3, k=1, trials=20, generator=g)
        assert whole["acc_hit"][i] == pytest.approx(float(ref[0]))


def test_the_renamed_chance_variant_is_one_clear_error():
    cfg = Config()
    assert "other-class" in cfg.eval.variants and "chance" not in cfg.eval.variants
    assert "control" in cfg.eval.variant("other-class").description
    with pytest.raises(ConfigError, match="^--variants: variant 'chance' was renamed 'other-class'"):
        select_variants(cfg, ["L+I", "chance"])

# recorded from a first run (CPU, float32; seeds per purpose: rows.SEEDING)
EXPECTED_IMAGE_SLICE = [0.390594, 0.575960, 0.574972, 0.269153, 0.371055, 0.630908, 0.177362, 0.223891, 0.743932]
EXPECTED_SSIM = [0.000510, -0.034725, -0.002863, -0.024347, -0.023090, -0.051385, 0.002650, -0.039338]
EXPECTED_PROB0 = [0.250427, 0.270210, 0.246332, 0.290800, 0.199347, 0.225607, 0.262046, 0.256748]
EXPECTED_ACC = [0.0, 0.45, 0.0, 0.45, 0.0, 1.0, 0.0, 1.0]
