"""Sample-level semantics: EEG -> caption embedding (NeuroImagen eq. 7).

    x (B, C, T) -> EEG encoder (registry) (B, D) -> Linear(D, hidden) -> GELU -> Dropout
      -> Linear(hidden, L * E) -> (B, L, E)

(L, E) is the shape of the text encoder's ``last_hidden_state`` (77 x 768 for Stable Diffusion
1.5's CLIP-L), so the prediction can be passed to the diffusion model as ``prompt_embeds``.

The head predicts *standardised* embeddings and the module maps them back with per-element
buffers ``target_mean``/``target_std`` (L, E), set from the training targets before training
(``set_target_stats``). Caption embeddings share most of their content (the BOS token, "An image
of", padding); standardising makes the squared error weigh the elements in which captions differ,
instead of letting the regressor settle on the mean caption. The output is in the text encoder's
own space, so the exported model needs nothing else.
"""

from __future__ import annotations

import torch
from torch import nn

from neuroimagen.models.eeg_encoders import build_encoder


class SemanticRegressor(nn.Module):
    """EEG (B, C, T) -> predicted caption embedding (B, tokens, token_dim)."""

    def __init__(self, n_chans: int, n_times: int, tokens: int, token_dim: int, encoder: str = "tsconv",
                 embed_dim: int = 128, width: int | None = None, hidden: int = 256, dropout: float = 0.25):
        super().__init__()
        self.tokens, self.token_dim = tokens, token_dim
        self.encoder = build_encoder(encoder, n_chans, n_times, embed_dim, width=width, dropout=dropout)
        self.head = nn.Sequential(
            nn.Linear(embed_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, tokens * token_dim)
        )
        self.register_buffer("target_mean", torch.zeros(tokens, token_dim))
        self.register_buffer("target_std", torch.ones(tokens, token_dim))

    @torch.no_grad()
    def set_target_stats(self, targets: torch.Tensor, eps: float = 1e-3) -> None:
        """Per-element mean/std of training targets (N, L, E); near-constant elements get std ``eps * mean std``."""
        std = targets.std(0)
        self.target_mean.copy_(targets.mean(0))
        self.target_std.copy_(std.clamp_min(eps * float(std.mean()) + 1e-12))

    def forward_standardised(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction in standardised target units: (B, C, T) -> (B, L, E)."""
        h = self.head(self.encoder(x))  # (B, L * E)
        return h.view(x.shape[0], self.tokens, self.token_dim)  # (B, L, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_standardised(x) * self.target_std + self.target_mean  # (B, L, E)
