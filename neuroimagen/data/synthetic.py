"""The synthetic twin: a dataset in exactly the real layouts whose EEG carries what the images show.

Images are simple objects: the class fixes shape and colour; each instance varies position, size and
background brightness (``synth.images``: ``objects``; ``glyphs``, a panel filled with the class's pattern in
its hue; ``cluttered``, the objects among random distractor shapes). By default (``synth.eeg_code:
sources``) the EEG is a linear mixture of oscillatory evoked sources (one frequency per source, spread over
10-85 Hz so every EEG-ImageNet band variant keeps some of them):

    source amplitudes = class code a_c  +  W_inst @ (instance attributes - 0.5)   (per trial jitter)
    eeg = gain_subject * (M_subject @ sources) * scale(snr)  +  spatially smooth 1/f noise
          + slow drift + line noise + white noise

so class *and* instance (position, size, background) are decodable, but only through noise, subject
gains and subject-specific mixing. ``bandpower`` carries them instead in the *power* of narrow-band rhythms
whose phase is new on every trial, in localised channel groups (a linear time-domain decoder sees nothing;
a band-power decoder does); ``erp`` in the latencies and amplitudes of time-locked low-frequency components
(the reverse). :data:`TWIN_FAMILY` names members that combine them with the image families. Segment lengths vary (EEG-ImageNet: T about 491-600, median ~505,
2 % over-long); everything is a function of the seed.

Files written (eeg-imagenet): ``eeg_{5_95,14_70,55_95}_std.pth``, ``eeg_signals_raw_with_mean_std.pth``,
``block_splits_by_image_{all,single}.pth``, ``images/<wnid>/<stem>.JPEG``; (things-eeg):
``sub-XX/preprocessed_eeg_{training,test}.npy``, ``image_set/{training,test}_images/<NNNNN_concept>/...``,
``image_set/image_metadata.npy``, with test concepts disjoint from the training ones (zero-shot, as the release). Both: ``captions.json`` (per-image attribute captions standing in
for BLIP), ``attributes.json`` (the ground truth), ``config.yaml`` (a config that reads the twin),
``.neuroimagen`` (the marker that lets ``--overwrite`` replace it).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw, ImageFilter

from neuroimagen.atomic import atomic_dir
from neuroimagen.config import to_dict
from neuroimagen.data.captions import attribute_caption
from neuroimagen.data.imagenet_classes import CLASS_NAMES, EEG_IMAGENET_WNIDS
from neuroimagen.logs import Progress, get_logger, progress
from neuroimagen.rundir import check_target, mark

_log = get_logger(__name__)

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "bar")
COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (235, 200, 30),
    "purple": (148, 72, 189),
}
BANDS = {"eeg_5_95_std.pth": (5.0, 95.0), "eeg_14_70_std.pth": (14.0, 70.0), "eeg_55_95_std.pth": (55.0, 95.0)}
RAW_FILE = "eeg_signals_raw_with_mean_std.pth"
N_SOURCES = 12
# Instance attribute ranges (fractions of the image side; background = grey level). Objects stay
# large and near the centre so that the class (shape, colour) shapes the picture: a saliency map that
# knows the class beats the mean image, as it should on real photographs of centred objects.
POSITION = (0.4, 0.6)
SIZE = (0.45, 0.7)
BACKGROUND = (0.3, 0.7)
N_SPLITS = 6
# channel names of the two THINGS-EEG2 layouts: the release's 17 occipito-parietal channels, and a 63-channel
# 10-10 montage that holds them in the same order (the reader takes names from the file, never assumes them)
THINGS_17 = ("Pz", "P3", "P7", "O1", "Oz", "O2", "P4", "P8", "P1", "P5", "PO7", "PO3", "POz", "PO4", "PO8", "P6", "P2")
THINGS_63 = tuple("Fp1 Fz F3 F7 FT9 FC5 FC1 C3 T7 TP9 CP5 CP1 Pz P3 P7 O1 Oz O2 P4 P8 TP10 CP6 CP2 Cz C4 T8 FT10 FC6 "
                  "FC2 F4 F8 Fp2 AF7 AF3 AFz F1 F5 FT7 FC3 C1 C5 TP7 CP3 P1 P5 PO7 PO3 POz PO4 PO8 P6 P2 CPz CP4 TP8 C6 "
                  "C2 FC4 FT8 F6 AF8 AF4 F2".split())


@dataclass(frozen=True)
class ImageSpec:
    stem: str
    label: int
    cx: float
    cy: float
    size: float
    background: float

    def attributes(self) -> np.ndarray:
        """Instance attributes (4,) that the EEG encodes, each scaled to [-0.5, 0.5]."""
        def unit(v, lo_hi):
            return (v - lo_hi[0]) / (lo_hi[1] - lo_hi[0]) - 0.5

        return np.array([unit(self.cx, POSITION), unit(self.cy, POSITION), unit(self.size, SIZE),
                         unit(self.background, BACKGROUND)])


# the glyph family: a fill pattern x a hue (5 x 8, coprime: unique for label < 40)
PATTERNS = ("striped", "checkered", "dotted", "ringed", "zigzag")
HUES = {
    "red": (200, 30, 45), "orange": (235, 120, 20), "olive": (150, 150, 20), "green": (30, 150, 60),
    "teal": (20, 140, 150), "blue": (40, 70, 210), "violet": (130, 50, 200), "pink": (225, 90, 170),
}
IMAGE_FAMILIES = ("objects", "glyphs", "cluttered")
EEG_CODES = ("sources", "bandpower", "erp")
# Named members of the twin family (``neuroimagen data synth OUT --member NAME``): each changes how the EEG carries
# class and instance, the stimuli, the sizes and the seed, so that defaults which carry signal on all of them
# are not tuned to one generator. ``sources-objects`` is the embedded default's twin.
TWIN_FAMILY = {
    "sources-objects": {},
    "bandpower-objects": {"eeg_code": "bandpower", "classes": 8, "images_per_class": 10, "subjects": 3, "seed": 101},
    "erp-glyphs": {"eeg_code": "erp", "images": "glyphs", "classes": 8, "images_per_class": 12, "seed": 202},
    "bandpower-cluttered": {"eeg_code": "bandpower", "images": "cluttered", "classes": 6, "seed": 303},
}


def class_look(label: int, family: str = "objects") -> tuple[str, str]:
    """(shape, colour) of a class; unique for label < 40 in every family (8 shapes x 5 colours, or 5 patterns x
    8 hues: coprime counts). ``cluttered`` draws the objects' looks among distractors."""
    if family == "glyphs":
        return f"{PATTERNS[label % len(PATTERNS)]} panel", list(HUES)[label % len(HUES)]
    return SHAPES[label % len(SHAPES)], list(COLOURS)[label % len(COLOURS)]


# ---------------------------------------------------------------------------------------------
# Images


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles = [-90, 30, 150]
        return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in angles]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else 0.45 * r
            a = math.radians(-90 + 36 * k)
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    raise ValueError(shape)


def _draw_shape(draw, shape: str, cx: float, cy: float, r: float, fill, bg: int) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        ri = 0.55 * r
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=(bg, bg, bg))
    elif shape == "square":
        q = 0.85 * r
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif shape == "cross":
        w = 0.33 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif shape == "bar":
        draw.rectangle([cx - r, cy - 0.35 * r, cx + r, cy + 0.35 * r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


def _pattern(pattern: str, S: int, period: float, phase: float) -> np.ndarray:
    """(S, S) mask in {0, 1} of a fill pattern with the given period (pixels)."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    if pattern == "striped":
        return (np.mod(xx + yy + phase, period) < period / 2).astype(float)
    if pattern == "checkered":
        return ((np.floor((xx + phase) / (period / 2)) + np.floor(yy / (period / 2))) % 2).astype(float)
    if pattern == "dotted":
        dx, dy = np.mod(xx + phase, period) - period / 2, np.mod(yy, period) - period / 2
        return (dx**2 + dy**2 < (0.3 * period) ** 2).astype(float)
    if pattern == "ringed":
        rr = np.hypot(xx - S / 2, yy - S / 2)
        return (np.mod(rr + phase, period) < period / 2).astype(float)
    if pattern == "zigzag":
        tri = np.abs(np.mod(xx + phase, period) - period / 2)
        return (np.mod(yy + tri, period) < period / 2).astype(float)
    raise ValueError(pattern)


def render_image(spec: ImageSpec, size: int, rng: np.random.Generator, family: str = "objects"):
    """A PIL image of ``spec`` in an image family (``synth.images``).

    objects: a coloured shape on a textured grey background; glyphs: a rounded panel filled with the class's
    pattern in its hue (position, size and background as for objects); cluttered: the object drawn over 6-10
    random distractor shapes of random colours, which carry no class information.
    """
    ss = 2  # supersample for smooth edges
    S = size * ss
    bg = int(round(255 * spec.background))
    texture = rng.normal(0.0, 6.0, size=(S // 8 + 1, S // 8 + 1, 3))
    base = np.clip(bg + np.kron(texture, np.ones((8, 8, 1)))[:S, :S], 0, 255).astype(np.uint8)
    im = Image.fromarray(base, "RGB").filter(ImageFilter.GaussianBlur(radius=3 * ss))
    draw = ImageDraw.Draw(im)
    shape, colour = class_look(spec.label, family)
    cx, cy, r = spec.cx * S, spec.cy * S, spec.size * S / 2
    if family == "glyphs":
        fill = np.asarray(HUES[colour], dtype=np.float64)
        mask = Image.new("L", (S, S), 0)
        ImageDraw.Draw(mask).rounded_rectangle([cx - r, cy - r, cx + r, cy + r], radius=0.35 * r, fill=255)
        pat = _pattern(shape.split()[0], S, period=max(4.0, 0.45 * r), phase=float(rng.uniform(0, 8)))
        ink = fill * (0.45 + 0.55 * pat[..., None]) + 0.0  # the pattern in two shades of the hue
        panel = np.asarray(mask, dtype=np.float64)[..., None] / 255.0
        out = np.asarray(im, dtype=np.float64) * (1 - panel) + ink * panel
        return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB").resize((size, size), Image.LANCZOS)
    if family == "cluttered":
        for _ in range(int(rng.integers(6, 11))):
            d_shape = SHAPES[int(rng.integers(len(SHAPES)))]
            d_fill = tuple(int(v) for v in rng.integers(40, 230, size=3))
            dr = float(rng.uniform(0.06, 0.16)) * S
            _draw_shape(draw, d_shape, float(rng.uniform(0, S)), float(rng.uniform(0, S)), dr, d_fill, bg)
    _draw_shape(draw, shape, cx, cy, r, COLOURS[colour], bg)
    return im.resize((size, size), Image.LANCZOS)


# ---------------------------------------------------------------------------------------------
# EEG


class EEGModel:
    """The generative model of the twin's EEG (all randomness drawn once from the seed)."""

    def __init__(self, rng: np.random.Generator, n_classes: int, n_subjects: int, channels: int,
                 sfreq: float, onset: float, snr: float, code: str = "sources"):
        if code not in EEG_CODES:
            raise ValueError(f"synth.eeg_code: unknown code '{code}' (expected one of {', '.join(EEG_CODES)})")
        self.sfreq, self.onset, self.snr, self.C, self.code = sfreq, onset, snr, channels, code
        # Channel positions on a disk (sunflower), source topographies as smooth signed blobs.
        k = np.arange(channels) + 0.5
        rad, ang = np.sqrt(k / channels), k * math.pi * (3 - math.sqrt(5))
        self.pos = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)  # (C, 2)
        centres = rng.uniform(-0.8, 0.8, size=(N_SOURCES, 2))
        d2 = ((self.pos[:, None, :] - centres[None]) ** 2).sum(-1)  # (C, S)
        self.M = np.exp(-d2 / (2 * 0.35**2)) * rng.choice([-1.0, 1.0], size=N_SOURCES)  # (C, S)
        f_lo, f_hi = (10.0, 85.0) if sfreq >= 500 else (3.0, min(85.0, 0.4 * sfreq))
        self.freqs = np.geomspace(f_lo, f_hi, N_SOURCES)  # (S,)
        self.class_amp = rng.normal(0.0, 1.0, size=(n_classes, N_SOURCES))  # (K, S)
        self.class_phase = rng.uniform(0, 2 * math.pi, size=(n_classes, N_SOURCES))
        self.W_inst = rng.normal(0.0, 1.0, size=(N_SOURCES, 4))  # attributes span [-0.5, 0.5]
        # Subjects: channel gains and a perturbed mixing matrix.
        self.gain = np.exp(rng.normal(0.0, 0.25, size=(n_subjects, channels)))  # (P, C)
        self.M_subj = self.M[None] + 0.3 * rng.normal(0.0, 1.0, size=(n_subjects, channels, N_SOURCES)) * np.abs(self.M).mean()
        d2c = ((self.pos[:, None, :] - self.pos[None]) ** 2).sum(-1)
        K = np.exp(-d2c / (2 * 0.25**2))
        self.noise_mix = K / np.sqrt((K**2).sum(1, keepdims=True))  # (C, C), unit-norm rows
        self.scale = 1.0
        self.part_amp = self.part_phase = self.part_shift = self.inst_phase = None  # set by factorial()
        if code == "bandpower":
            # induced rhythms in localised channel groups: narrower topographies, one narrow band per source,
            # half below and half above 55 Hz so that every EEG-ImageNet band variant keeps some of them
            self.M = np.exp(-d2 / (2 * 0.22**2)) * rng.choice([-1.0, 1.0], size=N_SOURCES)
            self.M_subj = self.M[None] + 0.3 * rng.normal(0.0, 1.0, size=(n_subjects, channels, N_SOURCES)) * np.abs(self.M).mean()
            hi = min(88.0, 0.45 * sfreq)
            lo_band = (15.0, min(50.0, 0.8 * hi))
            hi_band = (58.0, hi) if hi > 62.0 else (0.8 * hi, hi)
            self.freqs = np.concatenate([np.geomspace(*lo_band, N_SOURCES // 2), np.geomspace(*hi_band, N_SOURCES - N_SOURCES // 2)])
        elif code == "erp":
            # time-locked components: a latency per source (80-400 ms after onset) shifted by the class, a width
            self.latency = rng.uniform(0.08, 0.40, size=N_SOURCES)
            self.class_shift = rng.normal(0.0, 1.0, size=(n_classes, N_SOURCES))
            self.width = rng.uniform(0.025, 0.06, size=N_SOURCES)

    def factorial(self, looks: list[tuple[str, str]], rng: np.random.Generator) -> None:
        """Replace the per-class codes by factorial ones, additive in each code's own signal space: class c with
        look (shape, colour) = ``looks[c]`` is the *sum* of a shape part's and a colour part's contributions, so an
        unseen class made of parts seen in training has a signal that a linear decoder trained on other classes
        reads (the THINGS twin's zero-shot test concepts).

        sources: each source's evoked signal is a_shape sin(2 pi f t + phi_shape) + a_colour sin(2 pi f t +
        phi_colour) + the instance's (W_inst @ attributes) sin(2 pi f t + phi_inst), under the common envelope
        (each part its own amplitude a ~ N(0, 1/2) and phase; the instance term its own phase, shared by all
        classes). erp: each part adds its own time-locked component per source (amplitude a_part, latency base
        + 40 ms x shift_part), the instance a component at the base latency; all shift with the instance's
        position. bandpower: the power code is a log-amplitude (an induced rhythm's phase is random, so its
        signal cannot add), and the parts add there: log-amplitude = 0.9 (a_shape + a_colour) / sqrt 2 + the
        instance's term, i.e. the log-powers add and the power is a product of a shape and a colour factor.
        """
        parts = sorted({p for look in looks for p in look})
        amp = {p: rng.normal(0.0, 1.0, size=N_SOURCES) for p in parts}
        phase = {p: rng.uniform(0, 2 * math.pi, size=N_SOURCES) for p in parts}
        shift = {p: rng.normal(0.0, 1.0, size=N_SOURCES) for p in parts}
        self.class_amp = np.stack([(amp[a] + amp[b]) / math.sqrt(2.0) for a, b in looks])  # (K, S): bandpower's code
        self.part_amp = np.stack([[amp[a], amp[b]] for a, b in looks]) / math.sqrt(2.0)  # (K, 2, S)
        self.part_phase = np.stack([[phase[a], phase[b]] for a, b in looks])  # (K, 2, S)
        self.part_shift = np.stack([[shift[a], shift[b]] for a, b in looks])  # (K, 2, S)
        self.inst_phase = rng.uniform(0, 2 * math.pi, size=N_SOURCES)

    def clean(self, label: int, attrs: np.ndarray, subject: int, T: int, rng: np.random.Generator) -> np.ndarray:
        """Noise-free stimulus-related signal (C, T) of one trial, in the model's code (``synth.eeg_code``)."""
        t = np.arange(T) / self.sfreq - self.onset - rng.normal(0.0, 0.008)  # latency jitter
        if self.code == "bandpower":
            # log-amplitudes carry class and instance; the rhythm's phase is new on every trial (not phase-locked),
            # so averaging trials cancels it and only its power is informative
            log_amp = 0.9 * self.class_amp[label] + 0.6 * (self.W_inst @ attrs) + 0.15 * rng.normal(size=N_SOURCES)
            u = np.clip((t - 0.05) / 0.5, 0.0, 1.0)
            env = np.sin(math.pi * u) ** 2  # 0.05-0.55 s after onset
            spec = np.fft.rfft(rng.normal(size=(N_SOURCES, T)), axis=1)
            f = np.fft.rfftfreq(T, 1.0 / self.sfreq)
            spec *= np.exp(-0.5 * ((f[None] - self.freqs[:, None]) / 1.5) ** 2)  # about 3 Hz wide
            nb = np.fft.irfft(spec, n=T, axis=1)
            nb /= nb.std(axis=1, keepdims=True) + 1e-12
            src = np.exp(log_amp)[:, None] * env[None] * nb
            return self.gain[subject][:, None] * (self.M_subj[subject] @ src)
        if self.code == "erp" and self.part_amp is not None:  # factorial: the parts' components add
            jitter = 1.0 + 0.15 * rng.normal(size=N_SOURCES)
            amps = np.concatenate([self.part_amp[label], (self.W_inst @ attrs)[None]]) * jitter  # (3, S)
            shifts = np.concatenate([self.part_shift[label], np.zeros((1, N_SOURCES))])
            lat = self.latency + 0.04 * shifts + 0.01 * (self.W_inst[:, :2] @ attrs[:2])  # (3, S)
            comps = np.exp(-0.5 * ((t[None, None] - lat[..., None]) / self.width[None, :, None]) ** 2)  # (3, S, T)
            src = (amps[..., None] * comps).sum(0)
            return self.gain[subject][:, None] * (self.M_subj[subject] @ src)
        if self.code == "erp":
            amp = (self.class_amp[label] + self.W_inst @ attrs) * (1.0 + 0.15 * rng.normal(size=N_SOURCES))
            lat = self.latency + 0.04 * self.class_shift[label] + 0.01 * (self.W_inst[:, :2] @ attrs[:2])
            src = amp[:, None] * np.exp(-0.5 * ((t[None] - lat[:, None]) / self.width[:, None]) ** 2)
            return self.gain[subject][:, None] * (self.M_subj[subject] @ src)
        tau = 0.12
        u = np.clip((t - 0.04) / tau, 0.0, None)
        env = u * np.exp(1.0 - u)  # alpha function, peak 1 at 160 ms after onset
        if self.part_amp is not None:  # factorial: the shape's, the colour's and the instance's sinusoids add
            jitter = 1.0 + 0.15 * rng.normal(size=N_SOURCES)
            amps = np.concatenate([self.part_amp[label], (self.W_inst @ attrs)[None]]) * jitter  # (3, S)
            phases = np.concatenate([self.part_phase[label], self.inst_phase[None]])
            waves = np.sin(2 * math.pi * self.freqs[None, :, None] * t[None, None] + phases[..., None])  # (3, S, T)
            src = (amps[..., None] * waves).sum(0) * env[None]
            return self.gain[subject][:, None] * (self.M_subj[subject] @ src)
        amp = (self.class_amp[label] + self.W_inst @ attrs) * (1.0 + 0.15 * rng.normal(size=N_SOURCES))
        src = amp[:, None] * env[None] * np.sin(2 * math.pi * self.freqs[:, None] * t[None] + self.class_phase[label][:, None])
        return self.gain[subject][:, None] * (self.M_subj[subject] @ src)  # (C, T)

    def noise(self, T: int, rng: np.random.Generator) -> np.ndarray:
        """Spatially smooth 1/f noise + drift + line noise + white noise, about unit std: (C, T)."""
        C = self.C
        white = rng.normal(size=(C, T))
        f = np.fft.rfftfreq(T, 1.0 / self.sfreq)
        pink = np.fft.irfft(np.fft.rfft(white, axis=1) / np.sqrt(np.maximum(f, 1.0)), n=T, axis=1)
        pink /= pink.std(axis=1, keepdims=True) + 1e-12
        pink = self.noise_mix @ pink
        tt = np.arange(T) / self.sfreq
        drift = rng.normal(0, 0.5, size=(C, 1)) * tt[None] + rng.normal(0, 0.3, size=(C, 1)) * np.sin(
            2 * math.pi * 0.7 * tt[None] + rng.uniform(0, 6.3, size=(C, 1)))
        line = 0.1 * np.sin(2 * math.pi * 50.0 * tt[None] + rng.uniform(0, 6.3)) if self.sfreq > 120 else 0.0
        return pink + drift + line + 0.3 * rng.normal(size=(C, T))

    def calibrate(self, specs: list[ImageSpec], n_subjects: int, T: int, rng: np.random.Generator,
                  window: tuple[int, int] | None) -> None:
        """Set ``scale`` so that the evoked signal's std is ``snr`` x the noise std over the window."""
        sig = []
        for i, spec in enumerate(specs[:64]):
            x = self.clean(spec.label, spec.attributes(), i % n_subjects, T, rng)
            sig.append(x[:, window[0]: window[1]] if window else x)
        sig_std = float(np.std(np.stack(sig)))
        noise_std = float(np.std(np.stack([self.noise(T, rng) for _ in range(8)])))
        self.scale = self.snr * noise_std / max(sig_std, 1e-12)

    def trial(self, label: int, attrs: np.ndarray, subject: int, T: int, rng: np.random.Generator) -> np.ndarray:
        return self.scale * self.clean(label, attrs, subject, T, rng) + self.noise(T, rng)


def bandpass(x: np.ndarray, sfreq: float, lo: float, hi: float) -> np.ndarray:
    """Zero-phase FFT band-pass along time with 2 Hz cosine edges: (C, T) -> (C, T)."""
    T = x.shape[-1]
    f = np.fft.rfftfreq(T, 1.0 / sfreq)
    edge = 2.0
    gain = np.clip((f - (lo - edge)) / edge, 0, 1) * np.clip(((hi + edge) - f) / edge, 0, 1)
    gain = 0.5 - 0.5 * np.cos(math.pi * gain)
    return np.fft.irfft(np.fft.rfft(x, axis=-1) * gain, n=T, axis=-1)


# ---------------------------------------------------------------------------------------------
# Writers


def _image_specs(rng: np.random.Generator, labels: list[int], stems: list[str]) -> list[ImageSpec]:
    return [
        ImageSpec(stem=s, label=lab, cx=float(rng.uniform(*POSITION)), cy=float(rng.uniform(*POSITION)),
                  size=float(rng.uniform(*SIZE)), background=float(rng.uniform(*BACKGROUND)))
        for lab, s in zip(labels, stems)
    ]


def _caption(spec: ImageSpec, family: str = "objects") -> str:
    shape, colour = class_look(spec.label, family)
    cap = attribute_caption(colour, shape, spec.cx, spec.cy, spec.size, spec.background)
    return cap + " among other shapes" if family == "cluttered" else cap


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")


def _progress(iterable, total: int, desc: str, show: bool, unit: str = "seg"):
    """A bar on a terminal, a progress line every 30 s without one (``neuroimagen.logs``)."""
    desc = f"synth: {desc}"
    if iterable is None:
        return Progress(total=total, desc=desc, unit=unit, logger=_log, enabled=show)
    return progress(iterable, total=total, desc=desc, unit=unit, logger=_log, enabled=show)


def _split_images(rng: np.random.Generator, labels: np.ndarray) -> dict[str, np.ndarray]:
    """80/10/10 split of image indices, stratified by class."""
    out = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_hold = max(1, int(round(0.1 * len(idx))))
        out["test"].extend(idx[:n_hold].tolist())
        out["val"].extend(idx[n_hold: 2 * n_hold].tolist())
        out["train"].extend(idx[2 * n_hold:].tolist())
    return {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in out.items()}


def write_eeg_imagenet(out: Path, cfg, show_progress: bool = True) -> dict:
    """Write the EEG-ImageNet layout into ``out`` (an existing empty folder). Returns a summary."""
    rng = np.random.default_rng(cfg.seed)
    K, P, C = cfg.classes, cfg.subjects, cfg.channels
    wnids = list(EEG_IMAGENET_WNIDS[:K])
    # Images: stems '<wnid>_<number>' with distinct numbers, listed in a shuffled order like the release.
    labels, stems = [], []
    for c, w in enumerate(wnids):
        nums = rng.choice(np.arange(100, 50000), size=cfg.images_per_class, replace=False)
        labels += [c] * cfg.images_per_class
        stems += [f"{w}_{int(n)}" for n in nums]
    order = rng.permutation(len(stems))
    labels = [labels[i] for i in order]
    stems = [stems[i] for i in order]
    specs = _image_specs(rng, labels, stems)

    img_rng = np.random.default_rng([cfg.seed, 1])
    for spec in _progress(specs, len(specs), "images", show_progress, unit="img"):
        d = out / "images" / spec.stem.split("_")[0]
        d.mkdir(parents=True, exist_ok=True)
        render_image(spec, cfg.image_size, img_rng, cfg.images).save(d / f"{spec.stem}.JPEG", quality=92)

    sfreq = 1000.0
    model = EEGModel(np.random.default_rng([cfg.seed, 2]), K, P, C, sfreq, onset=0.0, snr=cfg.snr, code=cfg.eeg_code)
    eeg_rng = np.random.default_rng([cfg.seed, 3])
    model.calibrate(specs, P, 500, eeg_rng, (20, 460))
    # Presentation: every subject sees every image once, in the same order; the list interleaves subjects.
    n_seg = len(specs) * P
    lengths = np.minimum(491 + eeg_rng.exponential(20.0, size=n_seg).astype(int), 600)
    long = eeg_rng.random(n_seg) < 0.02
    lengths[long] = eeg_rng.integers(700, 1500, size=int(long.sum()))
    raw_gain = eeg_rng.uniform(8.0, 25.0, size=(C, 1))  # microvolt-like scale per channel
    raw_offset = eeg_rng.normal(0.0, 40.0, size=(C, 1))
    raw, entries = [], []
    seg = 0
    bar = _progress(None, n_seg, "eeg", show_progress)
    for img_i, spec in enumerate(specs):
        for p in range(P):
            T = int(lengths[seg])
            x = model.trial(spec.label, spec.attributes(), p, T, eeg_rng)
            raw.append((x * raw_gain + raw_offset).astype(np.float32))
            entries.append({"image": img_i, "label": spec.label, "subject": p + 1})
            seg += 1
            bar.update(1)
    bar.close()

    def save(name: str, arrays: list[np.ndarray], extra: dict) -> None:
        dataset = [dict(e, eeg=torch.from_numpy(a)) for e, a in zip(entries, arrays)]
        torch.save({"dataset": dataset, "labels": wnids, "images": stems, **extra}, out / name)

    cat = np.concatenate(raw, axis=1)
    means, stds = cat.mean(1).astype(np.float32), cat.std(1).astype(np.float32)  # (C,)
    save(RAW_FILE, raw, {"means": torch.from_numpy(means), "stddevs": torch.from_numpy(stds)})
    for name, (lo, hi) in BANDS.items():
        filt = [bandpass(a.astype(np.float64), sfreq, lo, hi) for a in raw]
        cat = np.concatenate(filt, axis=1)
        mu, sd = cat.mean(1, keepdims=True), cat.std(1, keepdims=True) + 1e-12
        save(name, [((a - mu) / sd).astype(np.float32) for a in filt], {})
        del filt, cat

    # Splits by image; _all indexes the whole list, _single one subject's list (same order for all).
    split_rng = np.random.default_rng([cfg.seed, 4])
    lab_arr = np.asarray(labels)
    subj = np.asarray([e["subject"] for e in entries])
    img = np.asarray([e["image"] for e in entries])
    all_splits, single_splits = [], []
    for _ in range(N_SPLITS):
        parts = _split_images(split_rng, lab_arr)
        all_splits.append({k: np.flatnonzero(np.isin(img, v)).tolist() for k, v in parts.items()})
        s1 = img[subj == 1]
        single_splits.append({k: np.flatnonzero(np.isin(s1, v)).tolist() for k, v in parts.items()})
    torch.save({"splits": all_splits}, out / "block_splits_by_image_all.pth")
    torch.save({"splits": single_splits}, out / "block_splits_by_image_single.pth")

    _write_json(out / "captions.json", {s.stem: _caption(s, cfg.images) for s in specs})
    _write_json(out / "attributes.json", {s.stem: _attributes(s, CLASS_NAMES[wnids[s.label]], cfg.images) for s in specs})
    return {"segments": n_seg, "images": len(specs), "classes": K, "subjects": P, "channels": C,
            "over_long_segments": int(long.sum()),
            "data": {"format": "eeg-imagenet", "eeg": "eeg_5_95_std.pth", "splits": "block_splits_by_image_all.pth",
                     "images": "images", "captions": "captions.json", "image_size": cfg.image_size}}


def _attributes(spec: ImageSpec, name: str, family: str = "objects") -> dict:
    shape, colour = class_look(spec.label, family)
    return {"label": spec.label, "class": name, "shape": shape, "colour": colour, "cx": round(spec.cx, 4),
            "cy": round(spec.cy, 4), "size": round(spec.size, 4), "background": round(spec.background, 4)}


def _concept(name: str) -> str:
    return "".join(ch for ch in name.lower().replace(" ", "_") if ch.isalnum() or ch in "_-")


def _things_folders(concepts: list[str], labels: range) -> dict[int, str]:
    """label -> '<NNNNN>_<concept>' folder, numbered from 1 in alphabetical order of the concepts (as the release)."""
    ordered = sorted(labels, key=lambda c: concepts[c])
    return {c: f"{i + 1:05d}_{concepts[c]}" for i, c in enumerate(ordered)}


def write_things_eeg(out: Path, cfg, show_progress: bool = True) -> dict:
    """Write the THINGS-EEG2 layout into ``out`` (an existing empty folder). Returns a summary.

    The release's structure, scaled down: ``classes`` training concepts of ``images_per_class`` images (real
    1654 x 10) and ``test_classes`` test concepts of one image each (real 200 x 1), disjoint from the training
    concepts, so evaluation is zero-shot; ``train_repetitions`` repetitions of each training image (real 4),
    ``test_repetitions`` of each test image (real 80); channels x samples from ``synth.layout`` (17 x 100 or
    63 x 250, with their channel names) or ``synth.channels`` x ``synth.times``. Concept folders are numbered in
    alphabetical order within each set; ``image_set/image_metadata.npy`` holds the release's keys (per image:
    ``{train,test}_img_files``, ``{train,test}_img_concepts`` (the folder), ``{train,test}_img_concepts_THINGS``
    (the concept's number in the whole concept list, alphabetical over both sets, and its name)). The EEG's
    class code is factorial (a part per shape plus a part per colour, :meth:`EEGModel.factorial`): a test
    concept is an unseen combination of parts seen in training, as an unseen real concept shares visual
    features with the training ones.
    """
    rng = np.random.default_rng(cfg.seed)
    K, Kt, P = cfg.classes, cfg.test_classes, cfg.subjects
    C, T = cfg.shape()
    # label c < K: a training concept, K <= c < K + Kt: a test concept (distinct names, looks and codes)
    names = [CLASS_NAMES[w] for w in EEG_IMAGENET_WNIDS[:K + Kt]]
    concepts = [_concept(n) for n in names]
    folders = {**_things_folders(concepts, range(K)), **_things_folders(concepts, range(K, K + Kt))}
    things_id = {c: i + 1 for i, c in enumerate(sorted(range(K + Kt), key=lambda c: concepts[c]))}
    n_img = cfg.images_per_class
    width = max(2, len(str(n_img)))
    # rows in the reader's order: concept folders sorted, images sorted within a folder
    train_specs = [(c, f"{concepts[c]}_{k + 1:0{width}d}b") for c in sorted(range(K), key=folders.get)
                   for k in range(n_img)]
    test_specs = [(c, f"{concepts[c]}_01s") for c in sorted(range(K, K + Kt), key=folders.get)]
    train = _image_specs(rng, [c for c, _ in train_specs], [s for _, s in train_specs])
    test = _image_specs(rng, [c for c, _ in test_specs], [s for _, s in test_specs])

    img_rng = np.random.default_rng([cfg.seed, 1])
    set_dir = out / "image_set"
    meta: dict[str, list[str]] = {f"{key}_img_{part}": [] for key in ("train", "test")
                                  for part in ("files", "concepts", "concepts_THINGS")}
    for which, specs in (("training", train), ("test", test)):
        key = "train" if which == "training" else "test"
        for spec in _progress(specs, len(specs), f"{which} images", show_progress, unit="img"):
            d = set_dir / f"{which}_images" / folders[spec.label]
            d.mkdir(parents=True, exist_ok=True)
            render_image(spec, cfg.image_size, img_rng, cfg.images).save(d / f"{spec.stem}.jpg", quality=92)
            meta[f"{key}_img_files"].append(f"{spec.stem}.jpg")
            meta[f"{key}_img_concepts"].append(folders[spec.label])
            meta[f"{key}_img_concepts_THINGS"].append(f"{things_id[spec.label]:05d}_{concepts[spec.label]}")
    np.save(set_dir / "image_metadata.npy", meta, allow_pickle=True)

    sfreq = float(T)  # one second per segment, stimulus onset at 0.2 s
    model = EEGModel(np.random.default_rng([cfg.seed, 2]), K + Kt, P, C, sfreq, onset=0.2, snr=cfg.snr,
                     code=cfg.eeg_code)
    model.factorial([class_look(c, cfg.images) for c in range(K + Kt)], np.random.default_rng([cfg.seed, 5]))
    eeg_rng = np.random.default_rng([cfg.seed, 3])
    model.calibrate(train, P, T, eeg_rng, None)
    ch_names = list(THINGS_17) if C == 17 else list(THINGS_63) if C == 63 else [f"E{i + 1}" for i in range(C)]
    times = np.round(np.arange(T) / sfreq - 0.2, 6)
    reps = {"train": cfg.train_repetitions, "test": cfg.test_repetitions}
    total = P * (len(train) * reps["train"] + len(test) * reps["test"])
    bar = _progress(None, total, "eeg", show_progress)
    for p in range(P):
        sub = out / f"sub-{p + 1:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        for fname, specs, r_n in (("preprocessed_eeg_training.npy", train, reps["train"]),
                                  ("preprocessed_eeg_test.npy", test, reps["test"])):
            data = np.empty((len(specs), r_n, C, T), dtype=np.float32)  # (images, repetitions, channels, time)
            for i, spec in enumerate(specs):
                for r in range(r_n):
                    data[i, r] = model.trial(spec.label, spec.attributes(), p, T, eeg_rng)
                    bar.update(1)
            np.save(sub / fname, {"preprocessed_eeg_data": data, "ch_names": ch_names, "times": times}, allow_pickle=True)
    bar.close()
    every = train + test
    _write_json(out / "captions.json", {s.stem: _caption(s, cfg.images) for s in every})
    _write_json(out / "attributes.json", {s.stem: _attributes(s, names[s.label], cfg.images) for s in every})
    return {"segments": total, "images": len(every), "classes": K, "test_classes": Kt, "subjects": P, "channels": C,
            "times": T, "data": {"format": "things-eeg", "eeg": ".", "images": "image_set", "captions": "captions.json",
                                 "image_size": cfg.image_size}}


def synthesize(out: str | os.PathLike, cfg, overwrite: bool = False, show_progress: bool = True) -> dict:
    """Write the twin described by ``cfg`` (a ``SynthConfig``) to ``out`` atomically.

    ``overwrite`` replaces only a twin neuroimagen wrote (``rundir.kind_of`` says ``twin``); any other
    non-empty ``out`` is an ``OutputError`` and stays as it was. Returns a summary dict.
    ``out/config.yaml`` reads the twin with relative paths, so the folder can be moved.
    """
    cfg.validate("synth")  # a SynthConfig built in code is checked as a loaded one
    check_target(out, "twin", overwrite)
    with atomic_dir(out, overwrite=True) as stage:
        mark(stage, "twin", "neuroimagen synthetic twin", created=False)  # no timestamp: same seed, same bytes
        writer = write_eeg_imagenet if cfg.format == "eeg-imagenet" else write_things_eeg
        summary = writer(stage, cfg, show_progress=show_progress)
        config = {"seed": cfg.seed, "data": summary["data"], "synth": to_dict(cfg)}
        text = ("# Config of a neuroimagen synthetic twin; paths are relative to this file.\n"
                "# Use it as: neuroimagen <command> --config " + "<this file>\n" + yaml.safe_dump(config, sort_keys=False))
        (stage / "config.yaml").write_text(text, encoding="utf-8")
        _write_json(stage / "synth.json", {k: v for k, v in summary.items() if k != "data"})
    summary["out"] = str(Path(out))
    return summary
