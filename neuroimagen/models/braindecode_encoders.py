"""braindecode models as EEG encoders: ``stages.encoder.name: braindecode:<Model>``.

A braindecode model maps (B, n_chans, n_times) EEG to (B, n_outputs) scores; with ``n_outputs = embed_dim``
its final layer is the embedding, so it fits the encoders' contract (``neuroimagen.models.eeg_encoders``)::

    BraindecodeEncoder(n_chans, n_times, embed_dim, width=None, dropout=0.0, l2_normalize=False, model=NAME)

``n_chans``, ``n_times`` and ``n_outputs`` are wired from the data; every other hyper-parameter (filters,
kernel lengths, pools) is the model's own published default, so ``width`` must stay ``None``. ``dropout`` sets
each of the rates the model takes as arguments (``drop_prob``; ATCNet's three); the few rates
fixed inside a model stay (EEGConformer's classifier: 0.5 and 0.3). Models with a minimum input length (the
pools of ShallowFBCSPNet and EEGConformer need about 100 samples) fail at construction with one line naming
the length, not at the first batch. braindecode is an optional extra (``pip install -e '.[braindecode]'``):
it is imported only when such an encoder is built.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

import torch
from torch import nn

from neuroimagen.config import BRAINDECODE_ENCODERS

# names braindecode has changed across releases: ours -> the candidates, newest first
_ALIASES = {"EEGNetv4": ("EEGNet", "EEGNetv4"), "EEGNet": ("EEGNet", "EEGNetv4")}
_DROPOUT_KEYS = ("drop_prob", "att_drop_prob", "conv_block_dropout", "tcn_drop_prob")


def braindecode_class(model: str) -> type[nn.Module]:
    """The braindecode model class of ``model`` (one of ``BRAINDECODE_ENCODERS``)."""
    if model not in BRAINDECODE_ENCODERS:
        raise ValueError(f"unknown braindecode model '{model}' (supported: {', '.join(BRAINDECODE_ENCODERS)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # braindecode/MNE import-time deprecation chatter
            models = importlib.import_module("braindecode.models")
    except ImportError as exc:
        raise ValueError(f"encoder 'braindecode:{model}' needs the braindecode package "
                         f"(pip install -e '.[braindecode]'): {exc}") from None
    for name in _ALIASES.get(model, (model,)):
        if hasattr(models, name):
            return getattr(models, name)
    raise ValueError(f"braindecode {getattr(models, '__version__', '')} has no model '{model}'")


class BraindecodeEncoder(nn.Module):
    """A braindecode model whose ``n_outputs`` is the embedding size."""

    DEFAULT_WIDTH = None  # the model's own sizes

    def __init__(self, n_chans: int, n_times: int, embed_dim: int, width: int | None = None,
                 dropout: float = 0.0, l2_normalize: bool = False, *, model: str):
        super().__init__()
        for key, value in (("n_chans", n_chans), ("n_times", n_times), ("embed_dim", embed_dim)):
            if int(value) != value or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if width is not None:
            raise ValueError(f"braindecode:{model} keeps its published sizes: width must be null, got {width!r}")
        cls = braindecode_class(model)
        params = inspect.signature(cls.__init__).parameters
        kwargs = {k: float(dropout) for k in _DROPOUT_KEYS if k in params}
        self.model, self.n_chans, self.n_times, self.embed_dim, self.width = model, n_chans, n_times, embed_dim, None
        self.l2_normalize = l2_normalize
        try:  # a model too deep for n_times fails in its constructor or at the first forward: here, in one line
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "LogSoftmax is deprecated", "chs_info not given", ...
                self.net = cls(n_chans=int(n_chans), n_outputs=int(embed_dim), n_times=int(n_times), **kwargs)
                self.net.eval()
                with torch.no_grad():
                    out = self.net(torch.zeros(1, self.n_chans, self.n_times))
                self.net.train()
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"braindecode:{model} cannot read segments of {n_times} samples x {n_chans} channels "
                             f"(too short for its kernels and pools?): {str(exc).splitlines()[0][:160]}") from None
        if tuple(out.shape) != (1, embed_dim):
            raise ValueError(f"braindecode:{model} returns shape {tuple(out.shape)} for one segment, "
                             f"expected (1, {embed_dim})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)  # (B, embed_dim)
        return nn.functional.normalize(z, p=2.0, dim=1) if self.l2_normalize else z
