"""EEG encoders: (B, C, T) float32 EEG -> (B, embed_dim) embedding.

Every encoder shares one constructor vocabulary (braindecode style)::

    Encoder(n_chans, n_times, embed_dim, width=None, dropout=0.0, l2_normalize=False)

``width=None`` picks the encoder's own default size (``DEFAULT_WIDTH`` on the class);
``l2_normalize=True`` makes every output row unit-norm. Encoders are plain ``nn.Module``s:
tensors in, tensors out, no I/O. ``build_encoder(name, ...)`` picks one from ``ENCODERS``.

    lstm        Spampinato et al. 2017 / Kavasidis et al. 2017 (Brain2Image) LSTM encoder
    channelnet  EEG-ChannelNet, Palazzo et al. 2020 (TPAMI), scaled down for CPU
    tsconv      temporal-spatial conv encoder of NICE (Song et al. 2024) / ATM (Li et al. 2024)
    braindecode:<Model>   a braindecode model (EEGNet, ShallowFBCSPNet, Deep4Net, EEGConformer, ATCNet) with
                n_outputs = embed_dim (:mod:`neuroimagen.models.braindecode_encoders`)
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from neuroimagen.models.braindecode_encoders import BraindecodeEncoder

__all__ = ["ENCODERS", "ChannelNetEncoder", "LSTMEncoder", "TSConvEncoder", "build_encoder"]


def _check_dims(n_chans: int, n_times: int, embed_dim: int, width: int, dropout: float) -> None:
    for name, value in (("n_chans", n_chans), ("n_times", n_times), ("embed_dim", embed_dim), ("width", width)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


@functools.lru_cache(maxsize=None)
def cpu_bf16_lstm_supported() -> bool:
    """Whether this CPU runs an LSTM under bfloat16 autocast (probed once, on a tiny LSTM).

    oneDNN has bf16 LSTM kernels only where the CPU has native bf16 (AVX-512 BF16 / AMX); on an
    AVX2-only CPU (or with ``ONEDNN_MAX_CPU_ISA=AVX2``) the forward raises "could not create a primitive
    descriptor for the LSTM forward propagation primitive". A probe is more faithful than reading CPU
    flags: it asks the very kernel that would fail.
    """
    lstm = nn.LSTM(2, 2, batch_first=True)
    try:
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            lstm(torch.zeros(1, 2, 2))
    except RuntimeError:
        logging.getLogger(__name__).info(
            "this CPU has no bf16 LSTM kernel: LSTM layers run in float32 inside bf16 autocast")
        return False
    return True


def _finish(z: torch.Tensor, l2_normalize: bool) -> torch.Tensor:
    """Optional per-row L2 normalisation of (B, D) embeddings."""
    return F.normalize(z, p=2.0, dim=1) if l2_normalize else z


# ---------------------------------------------------------------------------------------------------------------
# LSTM (Spampinato et al. 2017; Kavasidis et al. 2017 "Brain2Image")
# ---------------------------------------------------------------------------------------------------------------


class LSTMEncoder(nn.Module):
    """LSTM EEG encoder of Spampinato et al. 2017 ("Deep learning human mind for automated visual
    classification", CVPR) as used by Kavasidis et al. 2017 (Brain2Image) and EEGStyleGAN-ADA.

    The EEG is read as a sequence over time of C-channel vectors:

        x (B, C, T) -> transpose (B, T, C) -> LSTM(C, width), 1 layer -> last step (B, width)
          -> Dropout -> Linear(width, embed_dim) -> ReLU -> [L2 norm] -> (B, embed_dim)

    ``Linear + ReLU`` is the original's 128-d feature layer; the optional L2 normalisation follows
    EEGStyleGAN-ADA (a row the ReLU zeroes entirely stays zero). ``width`` is the LSTM hidden size
    (default 128). ``n_times`` is only validated: the LSTM takes any length.
    """

    DEFAULT_WIDTH = 128

    def __init__(self, n_chans: int, n_times: int, embed_dim: int, width: int | None = None,
                 dropout: float = 0.0, l2_normalize: bool = False):
        super().__init__()
        width = self.DEFAULT_WIDTH if width is None else width
        _check_dims(n_chans, n_times, embed_dim, width, dropout)
        self.n_chans, self.n_times, self.embed_dim, self.width = n_chans, n_times, embed_dim, width
        self.l2_normalize = l2_normalize
        self.lstm = nn.LSTM(input_size=n_chans, hidden_size=width, num_layers=1, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)  # (B, C, T) -> (B, T, C)
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and not cpu_bf16_lstm_supported():
            # no bf16 LSTM kernel on this CPU: this layer runs in float32, the rest of the model in bf16
            with torch.autocast(device_type="cpu", enabled=False):
                out, _ = self.lstm(x.float())  # (B, T, width)
        else:
            out, _ = self.lstm(x)  # (B, T, width)
        h = out[:, -1, :]  # (B, width): last time step
        z = F.relu(self.fc(self.dropout(h)))  # (B, embed_dim)
        return _finish(z, self.l2_normalize)


# ---------------------------------------------------------------------------------------------------------------
# EEG-ChannelNet (Palazzo et al. 2020, TPAMI)
# ---------------------------------------------------------------------------------------------------------------


def _conv_bn_relu(cin: int, cout: int, kernel, stride=1, padding=0, dilation=1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _ResidualBlock(nn.Module):
    """Two 3x3 convs with BN and an identity shortcut: (B, ch, H, W) -> (B, ch, H, W)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)), inplace=True)
        h = self.bn2(self.conv2(h))
        return F.relu(h + x)


class ChannelNetEncoder(nn.Module):
    """EEG-ChannelNet encoder (Palazzo et al. 2020, "Decoding brain representations by multimodal
    learning of neural activity and visual features", TPAMI), scaled down to run on a CPU.

    The EEG is a 1-channel image (B, 1, C, T); ``w = width`` (default 10, the original's number of filters
    per temporal branch):

    * temporal block: 5 parallel temporal convs (kernel (1, kt), dilation 1, 2, 4, 8, 16, "same" padding,
      stride (1, ts)), each with BN + ReLU, then an average pool over time down to T2 <= 32 steps;
      concatenated -> (B, 5w, C, T2). As in the original, 5w = 50 maps at the default width.
    * spatial block: 4 parallel convs across the channel axis, kernels (k, 1) with k ~ C, C/2, C/4, C/8,
      2w filters each, BN + ReLU; concatenated -> (B, 8w, H, T2) with H ~ 8 rows.
    * 2 residual blocks (two 3x3 convs + identity), each preceded by a stride-2 3x3 downsampling conv.
    * a final 3x3 conv to 4w maps, adaptive average pooling to (2, 4) (so every (C, T) works), dropout
      and a linear projection -> (B, embed_dim) [-> L2 norm].

    CPU-budget changes from the original (~47 GFLOP per forward of one 128 x 440 trial, this one ~0.17):
    temporal stride up to 4 instead of 2 plus the time pooling, spatial stride ~C/8 instead of 2, 2w
    instead of 50 filters per spatial branch, 2 instead of 4 residual blocks, downsampling before rather
    than after each residual block, and conv -> BN -> ReLU instead of BN -> ReLU -> conv.
    Sizes follow the input: ``kt = min(33, T // 8)`` (odd, >= 3), ``ts = clip(T // 64, 1, 4)``,
    spatial kernels ``C // 2**i`` made odd, so inputs down to (C, T) = (4, 32) work.
    """

    DEFAULT_WIDTH = 10
    DILATIONS = (1, 2, 4, 8, 16)
    N_SPATIAL = 4
    N_RESIDUAL = 2
    TIME_STEPS = 32  # time steps kept after the temporal block's pooling
    SPATIAL_ROWS = 8  # rows (channel axis) kept after the spatial block, roughly
    POOL_OUT = (2, 4)

    def __init__(self, n_chans: int, n_times: int, embed_dim: int, width: int | None = None,
                 dropout: float = 0.0, l2_normalize: bool = False):
        super().__init__()
        w = self.DEFAULT_WIDTH if width is None else width
        _check_dims(n_chans, n_times, embed_dim, w, dropout)
        self.n_chans, self.n_times, self.embed_dim, self.width = n_chans, n_times, embed_dim, w
        self.l2_normalize = l2_normalize

        # temporal block: same-length dilated convs -> T1 = ceil(T / t_stride) for every branch; each branch
        # gets its own BN (BN is per channel, so this equals one BN on the concatenation) and is pooled
        # before the concatenation, which keeps the big (B, w, C, T1) maps out of torch.cat
        kt = min(33, max(3, n_times // 8))
        kt += 1 - kt % 2  # odd
        t_stride = max(1, min(4, n_times // 64))  # original: 2 (at 1 kHz)
        t1 = (n_times - 1) // t_stride + 1
        t_pool = max(1, -(-t1 // self.TIME_STEPS))  # ceil
        self.temporal = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(1, w, (1, kt), stride=(1, t_stride), padding=(0, d * (kt - 1) // 2), dilation=(1, d),
                          bias=False),
                nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                nn.AvgPool2d((1, t_pool)) if t_pool > 1 else nn.Identity())
            for d in self.DILATIONS)
        c_t = w * len(self.DILATIONS)
        self.temporal_sizes = {"kernel": kt, "stride": t_stride, "pool": t_pool}

        # spatial block: odd kernels ~C / 2**i with padding (k - 1) / 2 -> equal heights for every branch
        s_stride = max(1, n_chans // self.SPATIAL_ROWS)
        kernels = []
        for i in range(self.N_SPATIAL):
            k = max(1, n_chans // 2 ** i)
            kernels.append(k - 1 + k % 2 if k > 1 else 1)  # odd
        self.spatial_kernels = tuple(kernels)
        self.spatial = nn.ModuleList(
            _conv_bn_relu(c_t, 2 * w, (k, 1), stride=(s_stride, 1), padding=((k - 1) // 2, 0)) for k in kernels)
        ch = 2 * w * self.N_SPATIAL

        # stages of [stride-2 downsampling conv, residual block]; stride 2 with padding 1 never takes a size
        # below 1, and downsampling first keeps the residual convs off the full-size map (CPU budget)
        blocks = []
        for _ in range(self.N_RESIDUAL):
            blocks += [_conv_bn_relu(ch, ch, 3, stride=2, padding=1), _ResidualBlock(ch)]
        self.residual = nn.Sequential(*blocks)

        self.final = _conv_bn_relu(ch, 4 * w, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(self.POOL_OUT)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * w * self.POOL_OUT[0] * self.POOL_OUT[1], embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)  # (B, C, T) -> (B, 1, C, T)
        h = torch.cat([branch(x) for branch in self.temporal], dim=1)  # 5 x (B, w, C, T2) -> (B, 5w, C, T2)
        h = torch.cat([conv(h) for conv in self.spatial], dim=1)  # (B, 8w, H, T2)
        h = self.residual(h)  # (B, 8w, H', T2'), H' ~ H / 4, T2' ~ T2 / 4
        h = self.pool(self.final(h))  # (B, 4w, H', T2') -> (B, 4w, 2, 4)
        h = h.flatten(1)  # (B, 4w * 8)
        z = self.fc(self.dropout(h))  # (B, embed_dim)
        return _finish(z, self.l2_normalize)


# ---------------------------------------------------------------------------------------------------------------
# TSConv (NICE, Song et al. 2024; ATM, Li et al. 2024)
# ---------------------------------------------------------------------------------------------------------------


class TSConvEncoder(nn.Module):
    """Temporal-spatial convolution encoder of NICE (Song et al. 2024, "Decoding natural images from EEG
    for object recognition", ICLR) as reused by ATM (Li et al. 2024, "Visual decoders for EEG").

        x (B, C, T) -> (B, 1, C, T)
          -> Conv2d(1, k, (1, kt)) -> AvgPool2d((1, pk), (1, ps)) -> BN -> ELU      (B, k, C, T2)
          -> Conv2d(k, k, (C, 1)) -> BN -> ELU -> Dropout                            (B, k, 1, T2)
          -> Conv2d(k, k, 1) projection -> flatten                                   (B, k * T2)
          -> Linear(k * T2, embed_dim) -> [L2 norm]                                  (B, embed_dim)

    ``k = width`` (default 40). With T >= 130 the original sizes are used (kt = 25, pool 51 stride 5);
    shorter inputs scale them down, ``kt = min(25, max(3, T // 4))``, ``pk = min(51, T1 // 2)``,
    ``ps = min(5, pk // 10)`` (all >= 1), so the time axis never collapses. The flattened size is
    found with a dry forward at construction. The first conv and the pool run fused as one strided
    conv (``_conv_pool``), which is exact and much cheaper on long inputs.
    """

    DEFAULT_WIDTH = 40

    def __init__(self, n_chans: int, n_times: int, embed_dim: int, width: int | None = None,
                 dropout: float = 0.0, l2_normalize: bool = False):
        super().__init__()
        k = self.DEFAULT_WIDTH if width is None else width
        _check_dims(n_chans, n_times, embed_dim, k, dropout)
        self.n_chans, self.n_times, self.embed_dim, self.width = n_chans, n_times, embed_dim, k
        self.l2_normalize = l2_normalize

        kt = min(25, max(3, n_times // 4), n_times)
        t1 = n_times - kt + 1
        pk = min(51, max(1, t1 // 2))
        ps = min(5, max(1, pk // 10))
        self.kernel_sizes = {"temporal": kt, "pool": pk, "pool_stride": ps}
        self.tsconv = nn.Sequential(
            nn.Conv2d(1, k, (1, kt)),
            nn.AvgPool2d((1, pk), (1, ps)),
            nn.BatchNorm2d(k),
            nn.ELU(),
            nn.Conv2d(k, k, (n_chans, 1)),
            nn.BatchNorm2d(k),
            nn.ELU(),
            nn.Dropout(dropout),
        )
        self.projection = nn.Conv2d(k, k, (1, 1))
        self.register_buffer("_box", torch.full((1, 1, pk), 1.0 / pk), persistent=False)
        with torch.no_grad():  # dry forward for the flattened size (eval mode: BN stats stay untouched)
            was_training = self.training
            self.eval()
            n_flat = self._features(torch.zeros(1, n_chans, n_times)).shape[1]
            self.train(was_training)
        self.fc = nn.Linear(n_flat, embed_dim)

    def _conv_pool(self, x: torch.Tensor) -> torch.Tensor:
        """``tsconv[1](tsconv[0](x))`` computed as one strided conv: (B, 1, C, T) -> (B, k, C, T2).

        Temporal conv and average pool are both linear, so conv -> pool equals a conv with the composed
        kernel (conv kernel * box of length pk, length kt + pk - 1) at the pool's stride. Same result
        (up to float rounding) and gradients, several times less time and memory than materialising the
        (B, k, C, T1) conv output.
        """
        conv, pool = self.tsconv[0], self.tsconv[1]
        k, kt = conv.out_channels, conv.kernel_size[1]
        pk = self._box.shape[-1]
        w = F.conv1d(conv.weight.view(k, 1, kt), self._box, padding=pk - 1)  # (k, 1, kt + pk - 1)
        return F.conv2d(x, w.view(k, 1, 1, kt + pk - 1), conv.bias, stride=(1, pool.stride[1]))  # (B, k, C, T2)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)  # (B, C, T) -> (B, 1, C, T)
        h = self._conv_pool(x)  # (B, k, C, T2)
        h = self.tsconv[2:](h)  # (B, k, 1, T2)
        h = self.projection(h)  # (B, k, 1, T2)
        return h.flatten(1)  # (B, k * T2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(self._features(x))  # (B, k * T2) -> (B, embed_dim)
        return _finish(z, self.l2_normalize)


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------

ENCODERS: dict[str, type[nn.Module]] = {"lstm": LSTMEncoder, "channelnet": ChannelNetEncoder, "tsconv": TSConvEncoder}


def build_encoder(name: str, n_chans: int, n_times: int, embed_dim: int, **kwargs) -> nn.Module:
    """Build the registered encoder ``name``, or the braindecode model of ``braindecode:<Model>``
    (:mod:`neuroimagen.models.braindecode_encoders`); ``kwargs`` are ``width``, ``dropout``, ``l2_normalize``."""
    if isinstance(name, str) and name.startswith("braindecode:"):
        return BraindecodeEncoder(n_chans, n_times, embed_dim, model=name.split(":", 1)[1], **kwargs)
    try:
        cls = ENCODERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown encoder '{name}' (known: {', '.join(ENCODERS)})") from None
    return cls(n_chans, n_times, embed_dim, **kwargs)
