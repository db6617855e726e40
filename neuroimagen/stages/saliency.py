"""Stage 2: the saliency GAN G(z, f_theta(x)) (NeuroImagen eq. 2-6), f_theta frozen from stage 1.

Discriminator (eq. 2): hinge loss on DiffAugment-ed real and fake images, conditioned on f_theta(x).
Generator (eq. 6): ``alpha2 * L_adv`` (hinge, eq. 3) ``+ alpha1 * L_ms`` (mode seeking, eq. 4)
``+ alpha3 * (1 - SSIM(G, y))`` (eq. 5). A weight of 0 switches its term off.

Images are handled in [-1, 1] (tanh range) for G and D, and in [0, 1] for SSIM. Validation: SSIM and
pixel correlation of G(z, f(x)) against the ground-truth validation images, with z fixed per item;
``val_ssim_mean_image`` is the baseline of predicting the mean training image.
"""

from __future__ import annotations

import torch

from neuroimagen.augment import diff_augment
from neuroimagen.data.datasets import load_image
from neuroimagen.losses import hinge_d_loss, hinge_g_loss, mode_seeking_loss, ssim, ssim_loss
from neuroimagen.models.saliency_gan import sample_z
from neuroimagen.stages.base import Stage, TensorBatches, batched, describe_split
from neuroimagen.stages.encoder import build_from_spec
from neuroimagen.training.context import unwrap
from neuroimagen.training.samplers import GlobalBatchSampler


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


class SaliencyStage(Stage):
    name = "saliency"
    requires = ("encoder",)
    config_section = "saliency"
    image_mode = "path"
    select_metric = "val_ssim"
    select_mode = "max"
    protocol = ("SSIM (Gaussian window 11, sigma 1.5, data range 1, colour channels averaged) and Pearson pixel "
                "correlation of G(z, f(x)) at {sc.resolution} px against the validation-split images, z fixed per item, "
                "G in eval mode; baseline: the mean training image; model selected on val_ssim")

    @classmethod
    def chance(cls, data: dict, val_metrics: dict) -> dict:
        return {"baseline_mean_image_ssim": val_metrics.get("val_ssim_mean_image")}

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
        self.G = ctx.wrap(build_from_spec(self._specs["generator"]), image=True)
        self.D = ctx.wrap(build_from_spec(self._specs["discriminator"]), image=True)
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
        mean_img = ((self.img_train + 1) / 2).mean(0, keepdim=True)  # (1, 3, R, R)
        self.baseline = float(ssim(mean_img.expand_as(self.img_val), self.img_val).mean()) if len(self.img_val) else float("nan")
        self._data_desc = {"train": describe_split(train), "val": describe_split(val), "resolution": R,
                           "encoder": inputs.get("encoder_path")}

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

    def validate(self) -> dict[str, float]:
        if self.f_val.shape[0] == 0:
            return {"val_ssim": float("nan")}
        pred = self.generate(self.f_val, self.z_val)  # (M, 3, R, R) in [0, 1]
        return {"val_ssim": float(ssim(pred, self.img_val).mean()),
                "val_pixcorr": float(pixel_correlation(pred, self.img_val).mean()),
                "val_ssim_mean_image": self.baseline}
