"""Stage 2: the saliency GAN G(z, f_theta(x)) (NeuroImagen eq. 2-6), f_theta frozen from stage 1.

Discriminator (eq. 2): hinge loss on DiffAugment-ed real and fake images, conditioned on f_theta(x).
Generator (eq. 6): ``alpha2 * L_adv`` (hinge, eq. 3) ``+ alpha1 * L_ms`` (mode seeking, eq. 4)
``+ alpha3 * (1 - SSIM(G, y))`` (eq. 5). A weight of 0 switches its term off.

Images are handled in [-1, 1] (tanh range) for G and D, and in [0, 1] for SSIM. Validation, all on the
validation split at the saliency resolution, G in eval mode, every z fixed per item:

* ``val_ssim``, ``val_pixcorr``: SSIM and pixel correlation of G(z, f(x)) against the ground-truth images;
  ``val_ssim_mean_image`` is the baseline of predicting the mean training image.
* ``val_diversity``: what alpha1 (mode seeking) pays for: for each item, ``val_samples`` images of G for
  ``val_samples`` z, the mean absolute pixel difference ([0, 1] units) over all pairs, averaged over items
  (at most ``DIVERSITY_ITEMS`` evenly spaced ones, so validation costs at most ~2x G's pass over the split).
  0 = G ignores z.
* ``val_kid``: what alpha2 (adversarial) pays for: KID (cubic kernel, unbiased, mean over ``KID_SUBSETS``
  seeded subsets) between G's outputs and the ground-truth images, on the *embedded random-conv feature
  network* (:class:`RandomConvFeatures`: a fixed, seeded, untrained conv net, features centred and scaled
  with the ground-truth images' statistics). Not Inception-v3: the number ranks generators within this
  project and is not comparable with published KID. KID rather than FID because validation splits are small
  (FID is biased at small N and its covariances of 64 features are rank-deficient below 64 items).
  ``val_kid_mean_image`` is the KID of the mean training image (a blur with no detail), the reference that
  ``val_objective`` scales by.
* ``val_objective = val_ssim + objective_diversity * val_diversity - objective_kid * k / (k + val_kid_mean_image)``
  with ``k = max(val_kid, 0)`` (weights ``stages.saliency.objective_*``): the sweep objective, so that a sweep
  of alpha1 and alpha2 sees what those terms buy instead of SSIM alone, which only pushes them to their
  minimum. Every term lies in [0, 1]; the realism penalty is 0 for KID 0 and 1/2 for the mean image's KID.
* The collapse guard's numbers (does G read the EEG at all? A G that draws one condition-independent image can
  still beat the mean image on SSIM): ``val_ssim_shuffled``, the SSIM of G on *shuffled* features (a seeded
  derangement of the validation items, the same z) against the true images; ``val_condition_gain`` =
  ``val_ssim - val_ssim_shuffled`` and ``val_condition_gain_se``, the standard error of its per-item differences;
  ``val_spread_conditions`` / ``val_spread_z``: on a grid of ``GUARD_CONDITIONS`` evenly spaced items x
  ``val_samples`` shared z, the per-pixel standard deviation ([0, 1] units) across conditions (one z) and across z
  (one condition), averaged. ``SaliencyStage.guards`` turns them into the ``collapsed`` flag.

``val_condition_gain`` selects the exported epoch: a criterion that a constant or condition-independent image
cannot win (it scores 0, whatever its SSIM). Selecting on ``val_ssim`` rewards exactly that image: on a
band-power twin the untrained G's near-uniform output scored SSIM 0.40, above every trained epoch (best 0.38),
while the trained G's condition gain rose from 0 to 0.10.
"""

from __future__ import annotations

import math

import torch

from neuroimagen.augment import diff_augment
from neuroimagen.data.datasets import load_image
from neuroimagen.losses import hinge_d_loss, hinge_g_loss, mode_seeking_loss, ssim, ssim_loss
from neuroimagen.metrics.fid import kernel_inception_distance
from neuroimagen.models.saliency_gan import sample_z
from neuroimagen.stages.base import Stage, TensorBatches, batched, describe_split, shuffled_index
from neuroimagen.stages.encoder import build_from_spec
from neuroimagen.training.context import unwrap
from neuroimagen.training.samplers import GlobalBatchSampler

KID_SUBSETS = 10  # KID subsets of min(100, validation items) rows each
DIVERSITY_ITEMS = 256  # val_diversity on at most this many validation items (evenly spaced): S x this G images
# The collapse guard (SaliencyStage.guards): G's images do not depend on the EEG when
GUARD_CONDITIONS = 64  # (spreads measured on at most this many evenly spaced validation items x val_samples z)
COLLAPSE_SPREAD = 1e-3  # ... they barely vary across conditions: mean pixel std across conditions below this, or
COLLAPSE_RATIO = 0.1  # ... they vary over 10x more with z than with the EEG (spread_conditions < this x spread_z), or
COLLAPSE_GAIN = 1e-3  # ... the true EEG does not beat shuffled EEG: SSIM gain <= max(this, 2 standard errors)
SAMPLE_COLUMNS = 8  # the tracked sample grid (SaliencyStage.images): at most this many validation items


def load_images(ds, size: int) -> torch.Tensor:
    """All images of a split at ``size`` px: (N, 3, size, size) in [0, 1] (each file decoded once)."""
    rec = ds.recording
    cache: dict[str, torch.Tensor] = {}
    out = []
    for j in ds.indices:
        p = rec.image_paths[int(j)]
        if p not in cache:
            cache[p] = load_image(p, size)
        out.append(cache[p])
    return torch.stack(out) if out else torch.empty(0, 3, size, size)


def pixel_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of flattened images, per pair: (B, ...) x2 -> (B,)."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def sample_diversity(samples: torch.Tensor) -> float:
    """Mean absolute difference between the images of one condition, over all pairs and conditions.

    samples: (M, S, 3, R, R) in [0, 1], S >= 2 images (different z) per condition -> float in [0, 1].
    """
    M, S = samples.shape[:2]
    if S < 2:
        raise ValueError(f"samples: expected at least 2 images per condition, got {S}")
    i, j = torch.triu_indices(S, S, offset=1)  # all S (S - 1) / 2 pairs
    return float((samples[:, i] - samples[:, j]).abs().mean())


class RandomConvFeatures(torch.nn.Module):
    """The embedded feature network of the realism metrics: fixed, seeded, *untrained* (no weights to load).

        (B, 3, R, R) in [0, 1] -> 3 x [Conv 4x4 stride 2 -> ReLU] (16, 32, 64 channels) -> spatial mean
          -> (B, 64), minus the reference set's mean feature, over its root-mean-square spread (one scalar:
          per-feature scaling would blow up features that barely vary across the reference images)

    Random convolutional features are a known stand-in for a trained embedding when ranking generators
    (Naeem et al. 2020, "Reliable fidelity and diversity metrics for generative models"), but KID on them is
    not an Inception number: it is labelled ``random-conv`` wherever it is reported.
    """

    name = "random-conv"

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(3, 16, 4, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 4, 2, 1), torch.nn.ReLU(),
                torch.nn.Conv2d(32, 64, 4, 2, 1), torch.nn.ReLU())
        self.requires_grad_(False).eval()
        self.register_buffer("mean", torch.zeros(64))
        self.register_buffer("scale", torch.ones(()))
        self.seed = seed

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.net(x[i: i + 256].float()).mean(dim=(2, 3)) for i in range(0, len(x), 256)])

    def fit_reference(self, x: torch.Tensor) -> "RandomConvFeatures":
        """Centre and scale on reference images x (N, 3, R, R): afterwards their features have mean 0 and
        mean variance 1 per feature."""
        f = self.raw(x)  # (N, 64)
        self.mean.copy_(f.mean(0))
        self.scale.copy_((f - self.mean).pow(2).mean().sqrt().clamp_min(1e-6) if len(f) > 1 else torch.ones(()))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.raw(x) - self.mean) / self.scale  # (B, 64)


class SaliencyStage(Stage):
    name = "saliency"
    requires = ("encoder",)
    config_section = "saliency"
    image_mode = "path"
    select_metric = "val_condition_gain"
    select_mode = "max"
    protocol = ("SSIM (Gaussian window 11, sigma 1.5, data range 1, colour channels averaged) and Pearson pixel "
                "correlation of G(z, f(x)) at {sc.resolution} px against the validation-split images, z fixed per item, "
                "G in eval mode; baseline: the mean training image; val_diversity = mean absolute pixel difference "
                "([0, 1]) between G's images for {sc.val_samples} fixed z per validation item, over all pairs "
                "(at most 256 evenly spaced items); "
                "val_kid (cubic-kernel unbiased MMD^2, mean of 10 seeded subsets of min(100, N)) between G's outputs "
                "and the validation images on the embedded random-conv features (fixed seeded untrained conv net, "
                "64 features centred and scaled on the validation images; NOT Inception-v3, not comparable with "
                "published KID), val_kid_mean_image = the mean training image's KID; val_objective = val_ssim + "
                "{sc.objective_diversity} * val_diversity - {sc.objective_kid} * k / (k + val_kid_mean_image), k = "
                "max(val_kid, 0) (the sweep objective); collapse guard: val_condition_gain = val_ssim - "
                "val_ssim_shuffled (G on the features of another validation item, a seeded derangement, same z), "
                "val_spread_conditions / val_spread_z = mean per-pixel std of G across conditions (one z) / across "
                "{sc.val_samples} z (one condition) on at most 64 evenly spaced items; model selected on val_condition_gain")

    @classmethod
    def chance(cls, data: dict, val_metrics: dict) -> dict:
        return {"baseline_mean_image_ssim": val_metrics.get("val_ssim_mean_image")}

    @classmethod
    def guards(cls, data: dict, val_metrics: dict) -> dict:
        """``collapsed``: G's images do not depend on the EEG (see the module doc and the ``COLLAPSE_*`` tolerances)."""
        keys = ("val_condition_gain", "val_condition_gain_se", "val_spread_conditions", "val_spread_z")
        if any(val_metrics.get(k) is None for k in keys):
            return {}  # not measured (an empty validation split, or a checkpoint written before the guard)
        gain, se, spread_c, spread_z = (float(val_metrics[k]) for k in keys)
        tol = COLLAPSE_GAIN if math.isnan(se) else max(COLLAPSE_GAIN, 2 * se)
        reasons = []  # NaN numbers (fewer than two validation items) are not measured and never fire
        if spread_c < COLLAPSE_SPREAD:
            reasons.append(f"G's images barely change with the EEG (mean pixel std across conditions "
                           f"{spread_c:.2g} < {COLLAPSE_SPREAD:g})")
        elif spread_c < COLLAPSE_RATIO * spread_z:
            reasons.append(f"G's images vary {spread_z / spread_c:.3g}x more with z than with the EEG (mean pixel std "
                           f"across conditions {spread_c:.3g} vs across z {spread_z:.3g})")
        if gain <= tol:
            reasons.append(f"G's SSIM with the true EEG features is not above its SSIM with shuffled ones (gain {gain:.3g} <= "
                           f"tolerance {tol:.3g})")
        return {"collapsed": {"condition_gain": gain, "condition_gain_se": se, "tolerance": tol,
                              "ssim": val_metrics.get("val_ssim"), "ssim_shuffled": val_metrics.get("val_ssim_shuffled"),
                              "spread_conditions": spread_c, "spread_z": spread_z, "fired": bool(reasons),
                              "reason": "; ".join(reasons)}}

    def __init__(self, cfg, ctx, inputs):
        super().__init__(cfg, ctx, inputs)
        sc = cfg.stages.saliency
        self.sc = sc
        splits = inputs["splits"]
        train, val = splits["train"], splits["val"]
        # Frozen f_theta: features computed once, in eval mode.
        encoder = build_from_spec(inputs["encoder_spec"])
        encoder.load_state_dict(inputs["encoder_state"])
        encoder.requires_grad_(False)
        f_train = batched(encoder, train.eeg_tensor(), torch.device("cpu"))  # (N, D)
        f_val = batched(encoder, val.eeg_tensor(), torch.device("cpu"))  # (M, D)
        R = sc.resolution
        self.img_train = load_images(train, R) * 2 - 1  # (N, 3, R, R) in [-1, 1]
        self.img_val = load_images(val, R)  # (M, 3, R, R) in [0, 1]
        self.f_val = f_val
        D = f_train.shape[1]
        self._specs = {
            "generator": {"builder": "generator", "kwargs": {"z_dim": sc.z_dim, "cond_dim": D, "resolution": R, "width": sc.g_width}},
            "discriminator": {"builder": "discriminator", "kwargs": {"cond_dim": D, "resolution": R, "width": sc.d_width}},
        }
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        G, D_net = build_from_spec(self._specs["generator"]), build_from_spec(self._specs["discriminator"])
        for net in (G, D_net):  # both read the EEG feature standardised on the training features (CondNorm)
            net.cond_norm.set_stats(f_train)
        self.G = ctx.wrap(G, image=True)
        self.D = ctx.wrap(D_net, image=True)
        self._modules = {"generator": self.G, "discriminator": self.D}
        self._optimizers = {
            "generator": torch.optim.Adam(self.G.parameters(), lr=sc.lr, betas=tuple(sc.betas)),
            "discriminator": torch.optim.Adam(self.D.parameters(), lr=sc.lr, betas=tuple(sc.betas)),
        }
        bs = min(sc.batch_size, max(1, f_train.shape[0] // ctx.world_size))
        self.sampler = GlobalBatchSampler(f_train.shape[0], bs, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size)
        self.loader = TensorBatches({"feat": f_train, "image": self.img_train}, self.sampler, ctx.device)
        g = torch.Generator().manual_seed(cfg.seed + 17)
        self.z_val = sample_z(f_val.shape[0], sc.z_dim, generator=g)  # fixed z per validation item
        M = f_val.shape[0]
        self.div_items = torch.linspace(0, M - 1, min(M, DIVERSITY_ITEMS)).round().long().unique()  # (m,)
        self.z_samples = sample_z(len(self.div_items) * sc.val_samples, sc.z_dim, generator=g)  # S z per item
        # the collapse guard: shuffled conditions (every item gets another item's features, its own z) and a grid of
        # conditions x shared z (its own generator: the draws above stay as they were)
        self.shuffle_val = shuffled_index(M, cfg.seed + 41)  # (M,)
        self.guard_items = torch.linspace(0, M - 1, min(M, GUARD_CONDITIONS)).round().long().unique()  # (m_g,)
        self.z_grid = sample_z(sc.val_samples, sc.z_dim, generator=torch.Generator().manual_seed(cfg.seed + 43))
        mean_img = ((self.img_train + 1) / 2).mean(0, keepdim=True)  # (1, 3, R, R)
        self.baseline = float(ssim(mean_img.expand_as(self.img_val), self.img_val).mean()) if len(self.img_val) else float("nan")
        # realism: the embedded feature network, centred and scaled on the validation images (fixed for the run)
        self.features = RandomConvFeatures(seed=cfg.seed + 31)
        self.feat_val = self.features.fit_reference(self.img_val)(self.img_val) if len(self.img_val) else None
        self.kid_baseline = self._kid(mean_img.expand_as(self.img_val)) if len(self.img_val) >= 2 else float("nan")
        self._data_desc = {"train": describe_split(train), "val": describe_split(val), "resolution": R,
                           "encoder": inputs.get("encoder_path"),
                           "realism_features": f"{RandomConvFeatures.name} (seed {cfg.seed + 31}, untrained, 64 "
                                               f"features centred and scaled on the validation images; not Inception-v3)"}

    def export_modules(self):
        return {"generator": self.G}

    def train_step(self, batch: dict) -> dict[str, float]:
        ctx, sc, dev = self.ctx, self.sc, self.ctx.device
        real, c = ctx.image_batch(batch["image"]), batch["feat"]  # (B, 3, R, R) in [-1, 1], (B, D)
        B = real.shape[0]
        opt_g, opt_d = self._optimizers["generator"], self._optimizers["discriminator"]
        # --- D step (eq. 2): one forward over augmented real + fake
        with torch.no_grad(), ctx.autocast():
            fake = self.G(sample_z(B, sc.z_dim, device=dev), c).float()
        pair = torch.cat([diff_augment(real, sc.diffaugment), diff_augment(fake, sc.diffaugment)])  # (2B, 3, R, R)
        with ctx.autocast():
            logits = self.D(ctx.image_batch(pair), torch.cat([c, c])).float()  # (2B,)
        d_loss = hinge_d_loss(logits[:B], logits[B:])
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        # --- G step (eq. 6): two z per condition for mode seeking, one G forward; losses in float32
        z1, z2 = sample_z(B, sc.z_dim, device=dev), sample_z(B, sc.z_dim, device=dev)
        with ctx.autocast():
            out = self.G(torch.cat([z1, z2]), torch.cat([c, c])).float()  # (2B, 3, R, R)
        f1, f2 = out[:B], out[B:]
        if sc.alpha2 > 0:
            with ctx.autocast():
                adv = hinge_g_loss(self.D(ctx.image_batch(diff_augment(f1, sc.diffaugment)), c).float())
        else:
            adv = out.new_zeros(())
        ms = mode_seeking_loss(f1, f2, z1, z2) if sc.alpha1 > 0 else out.new_zeros(())
        ss = ssim_loss((f1 + 1) / 2, (real + 1) / 2) if sc.alpha3 > 0 else out.new_zeros(())
        g_loss = sc.alpha2 * adv + sc.alpha1 * ms + sc.alpha3 * ss
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        return {"d_hinge": float(d_loss.detach()), "g_adv": float(adv.detach()), "g_ms": float(ms.detach()),
                "g_ssim_loss": float(ss.detach()), "g_total": float(g_loss.detach())}

    def generate(self, feats: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Saliency maps for features (N, D) and noise (N, z_dim): (N, 3, R, R) in [0, 1], eval mode."""
        G = unwrap(self.G)
        was = G.training
        G.eval()
        outs = []
        with torch.no_grad():
            for i in range(0, feats.shape[0], 128):
                outs.append(G(z[i: i + 128].to(self.ctx.device), feats[i: i + 128].to(self.ctx.device)).float().cpu())
        G.train(was)
        return (torch.cat(outs) + 1) / 2

    def summary_images(self, epoch: int, epochs: int) -> dict[str, torch.Tensor]:
        """Every ``image_every`` epochs and after the last: one grid, ``saliency/samples``, whose columns are up to
        ``SAMPLE_COLUMNS`` evenly spaced validation items, the first row their images and each further row G for one
        of ``val_samples`` fixed z (shared by the columns): (3, (1 + S) (R + 2), m (R + 2)) in [0, 1]."""
        every = self.sc.image_every
        if every == 0 or len(self.guard_items) == 0 or not ((epoch + 1) % every == 0 or epoch == epochs - 1):
            return {}
        items = self.guard_items[torch.linspace(0, len(self.guard_items) - 1, min(len(self.guard_items), SAMPLE_COLUMNS))
                                 .round().long().unique()]  # (m,)
        m, S = len(items), len(self.z_grid)
        fake = self.generate(self.f_val[items].repeat(S, 1), self.z_grid.repeat_interleave(m, 0))  # (S * m, 3, R, R)
        rows = torch.cat([self.img_val[items], fake])  # ((1 + S) * m, 3, R, R): row-major, m columns
        rows = torch.nn.functional.pad(rows, (1, 1, 1, 1), value=1.0)
        n, c, h, w = rows.shape
        grid = rows.view(n // m, m, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, (n // m) * h, m * w)
        return {"saliency/samples": grid}

    def _kid(self, images: torch.Tensor) -> float:
        """KID of images (M, 3, R, R) in [0, 1] against the validation images, on the embedded features."""
        f = self.features(images)  # (M, 64)
        kid, _ = kernel_inception_distance(f, self.feat_val, subsets=KID_SUBSETS, subset_size=min(100, len(f)),
                                           generator=torch.Generator().manual_seed(self.cfg.seed + 37))
        return kid

    def validate(self) -> dict[str, float]:
        if self.f_val.shape[0] == 0:
            return {"val_ssim": float("nan"), "val_objective": float("nan"), "val_condition_gain": float("nan")}
        sc = self.sc
        pred = self.generate(self.f_val, self.z_val)  # (M, 3, R, R) in [0, 1]
        m, S = len(self.div_items), sc.val_samples
        many = self.generate(self.f_val[self.div_items].repeat_interleave(S, 0), self.z_samples)  # (m * S, 3, R, R)
        diversity = sample_diversity(many.view(m, S, *many.shape[1:]))
        kid = self._kid(pred) if len(pred) >= 2 else float("nan")  # KID needs two items per set
        per_item = ssim(pred, self.img_val)  # (M,)
        val_ssim = float(per_item.mean())
        k = max(kid, 0.0)
        return {"val_ssim": val_ssim,
                "val_pixcorr": float(pixel_correlation(pred, self.img_val).mean()),
                "val_ssim_mean_image": self.baseline,
                "val_diversity": diversity, "val_kid": kid, "val_kid_mean_image": self.kid_baseline,
                "val_objective": val_ssim + sc.objective_diversity * diversity
                                 - sc.objective_kid * k / max(k + self.kid_baseline, 1e-12),
                **self._condition_dependence(per_item)}

    def _condition_dependence(self, per_item: torch.Tensor) -> dict[str, float]:
        """The collapse guard's numbers (module doc); ``per_item``: (M,) SSIM of G on the true features."""
        M = len(per_item)
        shuffled = ssim(self.generate(self.f_val[self.shuffle_val], self.z_val), self.img_val)  # (M,), same z
        diff = (per_item - shuffled).double()  # (M,)
        m, S = len(self.guard_items), len(self.z_grid)
        grid = self.generate(self.f_val[self.guard_items].repeat_interleave(S, 0), self.z_grid.repeat(m, 1))
        grid = grid.view(m, S, *grid.shape[1:])  # (m, S, 3, R, R): conditions x shared z
        nan = float("nan")  # one validation item: nothing to shuffle, no spread across conditions
        return {"val_ssim_shuffled": float(shuffled.mean()), "val_condition_gain": float(diff.mean()) if M >= 2 else nan,
                "val_condition_gain_se": float(diff.std() / M ** 0.5) if M >= 2 else nan,
                "val_spread_conditions": float(grid.std(dim=0).mean()) if m >= 2 else nan,
                "val_spread_z": float(grid.std(dim=1).mean())}
