"""The pixel-level stage of NeuroImagen: a conditional GAN that draws a saliency map from an EEG feature.

NeuroImagen (Lan et al. 2023, sec. 3.2) follows EEG2Image (Singh et al. 2023): the generator maps a
noise vector ``z ~ U(-1, 1)^z_dim`` and the frozen EEG feature ``f_theta(x)`` to a small, blurry
"saliency map" of the seen image; a conditional discriminator judges (image, EEG feature) pairs.

    Generator      (z (B, z_dim), cond (B, cond_dim)) -> (B, 3, R, R) in [-1, 1]
    CondNorm       cond (B, cond_dim) -> (cond - shift) / scale, statistics of the training features
    Discriminator  (img (B, 3, R, R) in [-1, 1], cond (B, cond_dim)) -> (B,) real/fake logits
    sample_z       (B, z_dim) noise, uniform in [-1, 1)

Both networks read the EEG feature through a :class:`CondNorm`: the feature minus the training features' mean,
over their root-mean-square spread (statistics set once from the training features by the stage, saved with the
weights). Encoders differ in the scale of their features by orders of magnitude (a band-power encoder's outputs
are not a source encoder's); unnormalised, a small-scale condition is drowned by the noise ``z`` in G's first
layer and G learns one image for every EEG.

``R`` (``resolution``) is 32, 64 (the paper) or 128. Every conv/linear weight of both networks is
spectrally normalised (``torch.nn.utils.parametrizations.spectral_norm``, the parametrize API: the
raw weight lives in ``module.parametrizations.weight.original``). The discriminator is a projection
discriminator (Miyato & Koyama 2018, "cGANs with projection discriminator"). Losses (hinge, mode
seeking, SSIM) and DiffAugment live with the training code, not here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

__all__ = ["RESOLUTIONS", "CondNorm", "Discriminator", "Generator", "sample_z"]

RESOLUTIONS = (32, 64, 128)


def _check_resolution(resolution: int) -> int:
    """Number of factor-2 steps between 4x4 and ``resolution`` (3, 4 or 5)."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution: expected 32, 64 or 128, got {resolution!r}")
    return {32: 3, 64: 4, 128: 5}[resolution]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def sample_z(batch: int, z_dim: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Noise for the generator, ``U(-1, 1)^z_dim`` as in EEG2Image.

    Returns a (batch, z_dim) float32 tensor with values in [-1, 1). ``generator`` (a seeded
    ``torch.Generator`` on ``device``) makes the draw reproducible without touching the global RNG.
    """
    if isinstance(batch, bool) or int(batch) != batch or batch < 0:
        raise ValueError(f"batch: expected an integer >= 0, got {batch!r}")
    _check_positive(z_dim=z_dim)
    u = torch.rand(int(batch), int(z_dim), generator=generator, device=device)  # (B, z_dim) in [0, 1)
    return u * 2.0 - 1.0


class CondNorm(nn.Module):
    """The EEG feature as G and D read it: ``(c - shift) / scale``.

    ``shift`` (cond_dim,) is the training features' mean and ``scale`` (a scalar: one factor for all entries, so
    the relative size of the feature's entries is kept) their root-mean-square distance from it. Both are buffers
    (saved and loaded with the state dict); until :meth:`set_stats` is called the module is the identity.
    """

    def __init__(self, cond_dim: int):
        super().__init__()
        _check_positive(cond_dim=cond_dim)
        self.register_buffer("shift", torch.zeros(cond_dim))
        self.register_buffer("scale", torch.ones(()))

    @torch.no_grad()
    def set_stats(self, feats: torch.Tensor) -> "CondNorm":
        """Set shift and scale from training features (N, cond_dim); N < 2 keeps scale 1."""
        if feats.dim() != 2 or feats.shape[1] != self.shift.shape[0]:
            raise ValueError(f"feats: expected shape (N, {self.shift.shape[0]}), got {tuple(feats.shape)}")
        if len(feats) == 0:
            return self
        f = feats.detach().double()
        mean = f.mean(0)
        self.shift.copy_(mean.to(self.shift))
        if len(f) >= 2:
            rms = (f - mean).pow(2).sum(1).mean().sqrt()  # root-mean-square distance from the mean
            self.scale.copy_(rms.clamp_min(1e-8).to(self.scale))
        return self

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return (cond - self.shift.to(cond.dtype)) / self.scale.to(cond.dtype)


class Generator(nn.Module):
    """Conditional saliency-map generator G(z, c).

        cat(z, CondNorm(c)) (B, z_dim + cond_dim)
          -> SN-Linear -> (B, 8w * 4 * 4) -> reshape (B, 8w, 4, 4) -> BN -> ReLU
          -> n x [SN-ConvTranspose2d(k=4, s=2, p=1) -> BN -> ReLU]      4 -> 8 -> ... -> R
          -> SN-Conv2d(3x3, -> 3) -> tanh                                (B, 3, R, R) in [-1, 1]

    with ``w = width`` and ``n = log2(R / 4)``. The channel count halves at every upsampling
    step and never drops below ``w // 2`` (R=64, w=64: 512 -> 256 -> 128 -> 64 -> 32).

    Args:
        z_dim: noise size (input ``z`` of shape (B, z_dim), typically from :func:`sample_z`).
        cond_dim: size of the EEG feature ``cond`` (B, cond_dim).
        resolution: output side R: 32, 64 or 128.
        width: base width ``w``; the 4x4 seed has ``8 w`` channels.
    """

    def __init__(self, z_dim: int = 128, cond_dim: int = 128, resolution: int = 64, width: int = 64):
        super().__init__()
        n_up = _check_resolution(resolution)
        _check_positive(z_dim=z_dim, cond_dim=cond_dim, width=width)
        self.z_dim, self.cond_dim, self.resolution, self.width = z_dim, cond_dim, resolution, width

        floor = max(width // 2, 1)
        channels = [max(width * 8 // 2**k, floor) for k in range(n_up + 1)]  # channels at 4, 8, ..., R
        self.seed_channels = channels[0]
        self.cond_norm = CondNorm(cond_dim)
        self.fc = spectral_norm(nn.Linear(z_dim + cond_dim, channels[0] * 4 * 4))
        self.seed_act = nn.Sequential(nn.BatchNorm2d(channels[0]), nn.ReLU())
        self.blocks = nn.Sequential(*[
            nn.Sequential(
                spectral_norm(nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1)),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            )
            for c_in, c_out in zip(channels[:-1], channels[1:])
        ])
        self.to_rgb = spectral_norm(nn.Conv2d(channels[-1], 3, kernel_size=3, padding=1))

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """z (B, z_dim), cond (B, cond_dim) -> saliency map (B, 3, R, R) in [-1, 1]."""
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z: expected shape (B, {self.z_dim}), got {tuple(z.shape)}")
        if cond.dim() != 2 or cond.shape[1] != self.cond_dim or cond.shape[0] != z.shape[0]:
            raise ValueError(f"cond: expected shape ({z.shape[0]}, {self.cond_dim}), got {tuple(cond.shape)}")
        h = self.fc(torch.cat([z, self.cond_norm(cond)], dim=1))  # (B, 8w * 16)
        h = h.view(h.shape[0], self.seed_channels, 4, 4)  # (B, 8w, 4, 4)
        h = self.blocks(self.seed_act(h))  # (B, C_R, R, R)
        return torch.tanh(self.to_rgb(h))  # (B, 3, R, R)


class Discriminator(nn.Module):
    """Conditional projection discriminator D(img, c) (Miyato & Koyama 2018).

        img (B, 3, R, R)
          -> n x [SN-Conv2d(k=4, s=2, p=1) -> LeakyReLU(0.2)]     R -> R/2 -> ... -> 4
          -> SN-Conv2d(3x3) -> LeakyReLU(0.2)                     (B, 8w, 4, 4)
          -> sum over the 4x4 positions                           h (B, F = 8w)
        logit = SN-Linear(h) + sum(h * SN-Linear_nobias(CondNorm(c)), dim=1)   (B,)

    with ``w = width``, ``n = log2(R / 4)``; channels ``w, 2w, 4w, 8w, 8w, ...`` along the strided
    convs. The projection term makes the logit depend on the (image, EEG feature) pair.

    Args:
        cond_dim: size of the EEG feature ``cond`` (B, cond_dim).
        resolution: input side R: 32, 64 or 128.
        width: base width ``w``; the pooled feature has ``F = 8 w`` entries.
    """

    def __init__(self, cond_dim: int = 128, resolution: int = 64, width: int = 64):
        super().__init__()
        n_down = _check_resolution(resolution)
        _check_positive(cond_dim=cond_dim, width=width)
        self.cond_dim, self.resolution, self.width = cond_dim, resolution, width
        self.feature_dim = width * 8

        channels = [3] + [min(width * 2**k, self.feature_dim) for k in range(n_down)]  # at R, R/2, ..., 4
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        layers += [spectral_norm(nn.Conv2d(channels[-1], self.feature_dim, kernel_size=3, padding=1)),
                   nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.cond_norm = CondNorm(cond_dim)
        self.linear = spectral_norm(nn.Linear(self.feature_dim, 1))
        self.embed = spectral_norm(nn.Linear(cond_dim, self.feature_dim, bias=False))

    def forward(self, img: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """img (B, 3, R, R) in [-1, 1], cond (B, cond_dim) -> logits (B,) (higher = more real)."""
        r = self.resolution
        if img.dim() != 4 or tuple(img.shape[1:]) != (3, r, r):
            raise ValueError(f"img: expected shape (B, 3, {r}, {r}), got {tuple(img.shape)}")
        if cond.dim() != 2 or cond.shape[1] != self.cond_dim or cond.shape[0] != img.shape[0]:
            raise ValueError(f"cond: expected shape ({img.shape[0]}, {self.cond_dim}), got {tuple(cond.shape)}")
        h = self.features(img)  # (B, F, 4, 4)
        h = h.sum(dim=(2, 3))  # (B, F): global sum pooling
        out = self.linear(h).squeeze(1)  # (B,)
        return out + (h * self.embed(self.cond_norm(cond))).sum(dim=1)  # (B,) + projection term
