"""Band-power linear probe: the first sanity check of any EEG dataset.

Features are the log power of every channel in a few frequency bands (Welch-free: one periodogram
over the window); a multinomial logistic regression is fitted on the training split and scored on a
held-out split. On a dataset whose EEG carries class information it beats chance by a wide margin;
on label-shuffled training data it must not (that is how a leak would show).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

DEFAULT_BANDS = ((4.0, 8.0), (8.0, 13.0), (13.0, 20.0), (20.0, 30.0), (30.0, 45.0), (45.0, 60.0), (60.0, 80.0), (80.0, 100.0))


def band_power_features(eeg: torch.Tensor, sfreq: float, bands=DEFAULT_BANDS) -> np.ndarray:
    """(N, C, T) EEG -> (N, C * n_bands) log band powers (bands above Nyquist are dropped)."""
    x = eeg.double()
    x = x - x.mean(-1, keepdim=True)
    spec = torch.fft.rfft(x * torch.hann_window(x.shape[-1], dtype=x.dtype), dim=-1).abs() ** 2  # (N, C, F)
    freqs = torch.fft.rfftfreq(x.shape[-1], 1.0 / sfreq)
    feats = []
    for lo, hi in bands:
        m = (freqs >= lo) & (freqs < hi)
        if m.any():
            feats.append(torch.log(spec[..., m].mean(-1) + 1e-12))  # (N, C)
    return torch.cat(feats, dim=1).numpy()


@dataclass(frozen=True)
class ProbeResult:
    accuracy: float
    chance: float
    n_train: int
    n_test: int
    n_classes: int

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "chance": self.chance, "n_train": self.n_train,
                "n_test": self.n_test, "n_classes": self.n_classes}


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
              n_classes: int, seed: int = 0) -> ProbeResult:
    """Standardise, fit an L2 logistic regression, report held-out top-1 accuracy and chance (1/K)."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, random_state=seed))
    clf.fit(x_train, y_train)
    acc = float((clf.predict(x_test) == y_test).mean())
    return ProbeResult(accuracy=acc, chance=1.0 / n_classes, n_train=len(y_train), n_test=len(y_test), n_classes=n_classes)


def probe_datasets(train, test, sfreq: float, shuffle_labels: bool = False, seed: int = 0) -> ProbeResult:
    """Band-power probe from two ``EEGDataset`` splits; ``shuffle_labels`` permutes training labels. Chance is one
    over the classes of the training split (those the probe can answer): on THINGS-EEG2 the recording's classes
    also hold the unseen test concepts."""
    y_train = train.labels.numpy()
    if shuffle_labels:
        y_train = np.random.default_rng(seed).permutation(y_train)
    return fit_probe(band_power_features(train.eeg_tensor(), sfreq), y_train,
                     band_power_features(test.eeg_tensor(), sfreq), test.labels.numpy(),
                     n_classes=len(np.unique(train.labels.numpy())), seed=seed)


def sampling_rate(recording) -> float:
    """EEG-ImageNet is recorded at 1 kHz; THINGS-EEG2 segments span one second."""
    if recording.format == "eeg-imagenet":
        return 1000.0
    return float(recording.segments[0].shape[-1])
