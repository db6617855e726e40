"""The EEG side of stage ``clip_image``: an EEG encoder, a projection into the CLIP image-embedding space and the
learnable logit scale of the contrastive loss (NICE / ATM).

The projection is NICE's: ``Linear(embed_dim, proj_dim)``, a residual ``GELU -> Linear -> Dropout`` and a
``LayerNorm``. The logit scale is stored as ``log(1 / T)`` (CLIP's parametrisation) and kept within
``[0, log 100]`` (:meth:`ClipEEGModel.clamp_scale`, called after every optimiser step, as CLIP does).
``target_mean`` (a buffer) is the training images' mean CLIP embedding, subtracted from every image embedding
before the cosine (zeros when ``stages.clip_image.center_targets`` is false).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from neuroimagen.models.eeg_encoders import build_encoder

MAX_LOGIT_SCALE = math.log(100.0)


class ClipEEGModel(nn.Module):
    def __init__(self, n_chans: int, n_times: int, proj_dim: int, encoder: str = "tsconv", embed_dim: int = 128,
                 width: int | None = None, dropout: float = 0.25, temperature: float = 0.07):
        super().__init__()
        self.encoder = build_encoder(encoder, n_chans, n_times, embed_dim, width=width, dropout=dropout)
        self.proj = nn.Linear(embed_dim, proj_dim)
        self.residual = nn.Sequential(nn.GELU(), nn.Linear(proj_dim, proj_dim), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(proj_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.register_buffer("target_mean", torch.zeros(proj_dim))

    def set_target_mean(self, mean: torch.Tensor) -> None:
        self.target_mean.copy_(mean.reshape(self.target_mean.shape))

    def image_space(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings (N, P) as the loss and the retrieval compare them: minus ``target_mean``."""
        return image_embeds.to(self.target_mean) - self.target_mean

    @torch.no_grad()
    def clamp_scale(self) -> None:
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def forward(self, x: torch.Tensor, with_scale: bool = False):
        """EEG (B, C, T) -> projected embeddings (B, P); with ``with_scale`` also ``exp(logit_scale)`` (a scalar
        through the module's forward, so DDP sees it used)."""
        h = self.proj(self.encoder(x))
        z = self.norm(h + self.residual(h))
        return (z, self.logit_scale.exp()) if with_scale else z
