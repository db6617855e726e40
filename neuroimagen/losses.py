"""Losses of the NeuroImagen pipeline (Lan et al. 2023), equations numbered as in the paper.

- eq. 1: triplet loss on EEG embeddings, ``max(0, beta + d(a, p) - d(a, n))``, with three mining
  strategies (FaceNet "batch all", FaceNet / tfa ``TripletSemiHardLoss`` "semi hard", and
  "batch hard" of Hermans et al. 2017);
- eq. 2 / eq. 3: hinge GAN losses for the discriminator and the generator of the pixel stage;
- eq. 4: mode-seeking regulariser (Mao et al. 2019, MSGAN);
- eq. 5: SSIM loss (Wang et al. 2004), with an SSIM that matches ``skimage.metrics.structural_similarity``
  (``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``) exactly.

Everything is plain, vectorised PyTorch (no Python loop over the batch) and differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_MINING = ("batch_all", "semi_hard", "batch_hard")

_SQRT_EPS = 1e-16  # added under the square root only where the distance is exactly zero


# --------------------------------------------------------------------------------------------------
# eq. 1: triplet loss
# --------------------------------------------------------------------------------------------------


def pairwise_distances(emb: Tensor, squared: bool = True) -> Tensor:
    """All pairwise Euclidean distances of a batch of embeddings (the ``d`` of eq. 1).

    Args:
        emb: (B, D) embeddings, any real values.
        squared: if True return ``||e_i - e_j||^2``, else ``||e_i - e_j||``.

    Returns:
        (B, B) distances, ``>= 0``, exactly zero on the diagonal, same dtype as ``emb``.

    Computed as ``|e_i|^2 - 2 e_i.e_j + |e_j|^2`` and clamped at 0 (round-off can make it slightly
    negative). With ``squared=False`` the square root is taken of ``d + eps`` only where ``d == 0`` and
    the result is masked back to 0 there, so the gradient at identical points is 0 instead of NaN.
    """
    if emb.dim() != 2:
        raise ValueError(f"emb must be (B, D), got shape {tuple(emb.shape)}")
    dot = emb @ emb.transpose(0, 1)  # (B, B)
    sq_norm = torch.diagonal(dot)  # (B,)
    dist = sq_norm.unsqueeze(1) - 2.0 * dot + sq_norm.unsqueeze(0)  # (B, B)
    dist = dist.clamp_min(0.0)
    eye = torch.eye(emb.shape[0], dtype=torch.bool, device=emb.device)  # (B, B)
    dist = dist.masked_fill(eye, 0.0)
    if not squared:
        zero = dist == 0  # (B, B)
        dist = torch.sqrt(dist + zero.to(dist.dtype) * _SQRT_EPS)
        dist = dist.masked_fill(zero, 0.0)
    return dist


def triplet_loss(emb: Tensor, labels: Tensor, margin: float, mining: str = "semi_hard",
                 squared: bool = True, normalize: bool = False) -> tuple[Tensor, dict[str, float]]:
    """Triplet loss of eq. 1, ``max(0, margin + d(a, p) - d(a, n))``, with online mining.

    On raw embeddings a fixed margin has no scale: multiplying every embedding by s > 1 multiplies
    every distance gap by s (s^2 when squared), so an encoder can meet the margin by inflating its
    output norms instead of separating classes. With ``normalize`` the embeddings are put on the unit
    sphere first (FaceNet), the loss is invariant to their scale, and ``d`` is bounded: ``[0, 4]``
    squared (``[0, 2]`` for non-negative embeddings such as a ReLU output), ``[0, 2]`` Euclidean.

    Args:
        emb: (B, D) embeddings (B up to a few hundred: batch_all / semi_hard build (B, B, B) tensors).
        labels: (B,) integer class labels; classes may have unequal counts in the batch, and a class
            with one sample only supplies negatives.
        margin: the margin beta of eq. 1 (in units of ``d``, i.e. squared distance when ``squared``).
        mining: which triplets enter the mean
            - ``"batch_all"``: every valid triplet (a, p, n) with ``label[a] == label[p]``, ``a != p``,
              ``label[n] != label[a]``; the loss is the mean over the triplets whose loss is > 0
              (FaceNet "batch all"; 0 if there is none).
            - ``"batch_hard"``: per anchor, the hardest positive (largest ``d(a, p)``) and the hardest
              negative, i.e. the *closest* one (smallest ``d(a, n)``); mean over the anchors that have
              at least one positive and one negative.
            - ``"semi_hard"`` (FaceNet / tfa ``TripletSemiHardLoss``): for every positive pair (a, p),
              the negative with the smallest ``d(a, n)`` among those with ``d(a, n) > d(a, p)``, or,
              if there is none, the negative with the largest ``d(a, n)``; mean over the positive pairs
              (pairs whose anchor has no negative at all are not considered).
        squared: ``d`` is the squared Euclidean distance (paper) if True, the Euclidean one otherwise.
        normalize: L2-normalise each row of ``emb`` before the distances (idempotent on unit-norm rows).

    Returns:
        ``(loss, stats)``: a scalar loss ``>= 0`` and ``{"fraction_active": float, "n_triplets": float}``,
        the fraction of the considered triplets / anchors / pairs with a positive loss and how many
        were considered. Without any valid triplet the loss is a zero still connected to ``emb``'s
        graph (its gradient is 0) and ``n_triplets`` is 0.
    """
    if mining not in _MINING:
        raise ValueError(f"unknown mining '{mining}' (known: {', '.join(_MINING)})")
    if emb.dim() != 2 or labels.dim() != 1 or labels.shape[0] != emb.shape[0]:
        raise ValueError(f"expected emb (B, D) and labels (B,), got {tuple(emb.shape)} and {tuple(labels.shape)}")

    if normalize:
        emb = F.normalize(emb, p=2.0, dim=1)  # (B, D) unit rows
    d = pairwise_distances(emb, squared=squared)  # (B, B)
    b = emb.shape[0]
    same = labels.unsqueeze(0) == labels.unsqueeze(1)  # (B, B)
    eye = torch.eye(b, dtype=torch.bool, device=emb.device)  # (B, B)
    pos = same & ~eye  # (B, B): [a, p] is a positive pair
    neg = ~same  # (B, B): [a, n] is a negative pair

    if mining == "batch_all":
        valid = pos.unsqueeze(2) & neg.unsqueeze(1)  # (B, B, B): [a, p, n]
        raw = margin + d.unsqueeze(2) - d.unsqueeze(1)  # (B, B, B): margin + d(a, p) - d(a, n)
        per = torch.where(valid, F.relu(raw), torch.zeros_like(raw))  # (B, B, B)
        n_considered = valid.sum()
        n_active = (per > 0).sum()
        loss = per.sum() / n_active.clamp_min(1).to(per.dtype)
    elif mining == "batch_hard":
        hardest_pos = torch.where(pos, d, torch.full_like(d, -1.0)).amax(dim=1)  # (B,)
        far = d.detach().max() + 1.0  # larger than every distance: never wins a min
        hardest_neg = torch.where(neg, d, far).amin(dim=1)  # (B,): the CLOSEST negative
        valid = pos.any(dim=1) & neg.any(dim=1)  # (B,)
        raw = F.relu(margin + hardest_pos - hardest_neg)  # (B,)
        per = torch.where(valid, raw, torch.zeros_like(raw))  # (B,)
        n_considered = valid.sum()
        n_active = (per > 0).sum()
        loss = per.sum() / n_considered.clamp_min(1).to(per.dtype)
    else:  # semi_hard
        d_ap = d.unsqueeze(2)  # (B, B, 1): d(a, p)
        d_an = d.unsqueeze(1)  # (B, 1, B): d(a, n)
        outside = neg.unsqueeze(1) & (d_an > d_ap)  # (B, B, B): [a, p, n] negative farther than p
        far = d.detach().max() + 1.0
        semi_hard_neg = torch.where(outside, d_an, far).amin(dim=2)  # (B, B)
        farthest_neg = torch.where(neg, d, torch.full_like(d, -1.0)).amax(dim=1)  # (B,)
        chosen = torch.where(outside.any(dim=2), semi_hard_neg, farthest_neg.unsqueeze(1))  # (B, B)
        valid = pos & neg.any(dim=1, keepdim=True)  # (B, B): positive pairs whose anchor has a negative
        raw = F.relu(margin + d - chosen)  # (B, B)
        per = torch.where(valid, raw, torch.zeros_like(raw))  # (B, B)
        n_considered = valid.sum()
        n_active = (per > 0).sum()
        loss = per.sum() / n_considered.clamp_min(1).to(per.dtype)

    n = int(n_considered.item())
    stats = {"fraction_active": float(n_active.item()) / n if n > 0 else 0.0, "n_triplets": float(n)}
    return loss, stats


# --------------------------------------------------------------------------------------------------
# eq. 2-4: adversarial losses of the pixel stage
# --------------------------------------------------------------------------------------------------


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Hinge discriminator loss (eq. 2): ``mean(relu(1 - real)) + mean(relu(1 + fake))``.

    Args:
        real_logits: discriminator logits on real images, any shape (e.g. (B,) or (B, 1)), unbounded.
        fake_logits: logits on generated images, any shape.

    Returns:
        scalar ``>= 0``.
    """
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    """Hinge generator loss (eq. 3): ``-mean(fake)``.

    Args:
        fake_logits: discriminator logits on generated images, any shape, unbounded.

    Returns:
        scalar (unbounded).
    """
    return -fake_logits.mean()


def mode_seeking_loss(img1: Tensor, img2: Tensor, z1: Tensor, z2: Tensor, eps: float = 1e-5) -> Tensor:
    """Mode-seeking regulariser (eq. 4, Mao et al. 2019): ``1 / (mean|img1 - img2| / mean|z1 - z2| + eps)``.

    Minimising it pushes two images generated from the same condition but different latents apart,
    in proportion to how far apart the latents are (the means run over all elements, as in MSGAN).

    Args:
        img1, img2: (B, C, H, W) images generated from latents ``z1`` and ``z2`` (same shape).
        z1, z2: (B, Z) latent codes (same shape, not identical).
        eps: keeps the loss finite when the two images coincide.

    Returns:
        scalar ``> 0`` (at most ``1 / eps``).
    """
    ratio = (img1 - img2).abs().mean() / (z1 - z2).abs().mean()
    return 1.0 / (ratio + eps)


# --------------------------------------------------------------------------------------------------
# eq. 5: SSIM
# --------------------------------------------------------------------------------------------------


def _gaussian_1d(window_size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(window_size,) normalised Gaussian taps centred on the middle tap (as scipy.ndimage builds them)."""
    coords = torch.arange(window_size, dtype=torch.float64) - (window_size - 1) / 2.0  # (K,)
    g = torch.exp(-0.5 * (coords / sigma) ** 2)
    return (g / g.sum()).to(dtype=dtype, device=device)


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-image mean SSIM (Wang et al. 2004) with a Gaussian window; the similarity inside eq. 5.

    Local statistics come from a depthwise (separable) Gaussian convolution over the *valid* region
    only (no padding), ``K1 = 0.01``, ``K2 = 0.03``, population (co)variances; the SSIM map is averaged
    over the valid region and the channels. This equals ``skimage.metrics.structural_similarity(a, b,
    channel_axis=0, data_range=data_range, gaussian_weights=True, sigma=sigma,
    use_sample_covariance=False)``, which filters with reflection padding and then crops
    ``(window_size - 1) // 2`` pixels from every border, whenever ``window_size == 2 * int(3.5 * sigma
    + 0.5) + 1`` (11 for the default sigma 1.5).

    Args:
        x, y: (B, C, H, W) images with values in ``[0, data_range]`` (any range works; ``data_range``
            sets the constants), ``H, W >= window_size``.
        data_range: max - min of the value range (1 for [0, 1], 2 for [-1, 1], 255 for uint8 scale).
        window_size: odd side of the Gaussian window.
        sigma: standard deviation of the Gaussian window, in pixels.

    Returns:
        (B,) SSIM per image, in ``[-1, 1]`` (1 for identical images); differentiable in both inputs.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim expects two (B, C, H, W) tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd integer, got {window_size}")
    b, c, h, w = x.shape
    if h < window_size or w < window_size:
        raise ValueError(f"ssim needs images at least {window_size}x{window_size} (window_size={window_size}), "
                         f"got {h}x{w}")

    g = _gaussian_1d(window_size, sigma, x.dtype, x.device)  # (K,)
    stats_in = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (B, 5C, H, W)
    k_v = g.view(1, 1, window_size, 1).expand(5 * c, 1, window_size, 1)  # (5C, 1, K, 1)
    k_h = g.view(1, 1, 1, window_size).expand(5 * c, 1, 1, window_size)  # (5C, 1, 1, K)
    filt = F.conv2d(F.conv2d(stats_in, k_v, groups=5 * c), k_h, groups=5 * c)  # (B, 5C, H-K+1, W-K+1)
    ux, uy, uxx, uyy, uxy = filt.split(c, dim=1)  # 5 x (B, C, H', W')

    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    num = (2.0 * ux * uy + c1) * (2.0 * vxy + c2)
    den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
    return (num / den).mean(dim=(1, 2, 3))  # (B,)


def ssim_loss(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """SSIM loss (eq. 5): ``1 - mean over the batch of ssim(x, y)``.

    Args:
        x, y: (B, C, H, W) images in ``[0, data_range]``, ``H, W >= 11``.
        data_range: see :func:`ssim`.

    Returns:
        scalar in ``[0, 2]`` (0 for identical images).
    """
    return 1.0 - ssim(x, y, data_range=data_range).mean()


# --------------------------------------------------------------------------------------------------
# Stage clip_image: symmetric InfoNCE (CLIP; NICE / ATM on EEG)
# --------------------------------------------------------------------------------------------------


def clip_loss(eeg: Tensor, image: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE of paired rows: ``(CE(s * E I^T, diag) + CE(s * I E^T, diag)) / 2``, E and I the rows of
    ``eeg`` (B, D) and ``image`` (B, D) L2-normalised, ``s`` = ``logit_scale`` (the multiplier, 1/T, not its log).

    Row i's only positive is column i: the caller must give distinct images (a second row of image i would be a
    false negative; stage clip_image's batches hold every image at most once, ``DistinctGroupBatchSampler``)."""
    if eeg.ndim != 2 or eeg.shape != image.shape:
        raise ValueError(f"eeg and image must both be (B, D), got {tuple(eeg.shape)} and {tuple(image.shape)}")
    e = F.normalize(eeg.float(), dim=1)
    i = F.normalize(image.float(), dim=1)
    logits = logit_scale * (e @ i.T)  # (B, B)
    target = torch.arange(e.shape[0], device=e.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
