"""Stage 4, reconstruction: trained stages + frozen latent diffusion -> images. No training code here.

One *row* is one generated image: (subject, variant, test EEG trial, sample). :func:`build_rows` lists
them in a fixed order; three plain callables turn batches of rows (``dict`` of numpy arrays, the Ray Data
batch format) into images, and run unchanged in a loop (``eval.backend=local``, tests) or as Ray Data
actors (``neuroimagen.distributed.data``):

    Decode    EEG -> f_theta(x) -> saliency map G(z, f) (z seeded per row), and the prompt embedding
              (stage-3 regressor on label or per-image captions, the true caption, or the empty caption)
    Generate  init image + prompt embedding -> frozen LDM: img2img from the (upsampled) init image, or
              text-to-image from pure noise; one generator per row, seeded per row
    Score     (``neuroimagen.metrics.scoring``) classifier probabilities, N-way hits, SSIM, PNGs

A variant (``eval.definitions``) is data: where the init image comes from (saliency | noise | gt), where
the prompt embedding comes from (none | label | image | true_label | true_image), and whose EEG is used
(own | other_class). Seeds depend on (seed, trial, sample) only, so every variant of a trial starts from the
same noise: the variants are compared pairwise, not across different draws.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from neuroimagen.errors import ConfigError, DataError

SEMANTIC_STAGE = {"label": "semantic", "image": "semantic_image"}


def row_seed(seed: int, item: int, sample: int) -> int:
    """Per-image seed shared by all variants of (trial, sample)."""
    return int((seed * 1_000_003 + item * 7919 + sample * 104_729 + 17) % (2**31 - 1))


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9+._-]", "_", name)


def needed_stages(cfg, variants: Sequence[str]) -> list[str]:
    """Trained stages the requested variants read."""
    need = set()
    for name in variants:
        v = cfg.eval.variant(name)
        if v.init == "saliency":
            need.update({"encoder", "saliency"})
        if v.semantics in SEMANTIC_STAGE:
            need.add(SEMANTIC_STAGE[v.semantics])
    from neuroimagen.stages import STAGE_ORDER

    return [s for s in STAGE_ORDER if s in need]


def select_variants(cfg, requested: Optional[Sequence[str]]) -> list[str]:
    names = [d.name for d in cfg.eval.definitions]
    chosen = list(requested) if requested else list(cfg.eval.variants)
    bad = [v for v in chosen if v not in names]
    if bad:
        raise ConfigError(f"--variants: unknown variant '{bad[0]}' (defined: {', '.join(names)})")
    return chosen


def build_rows(cfg, recording, variants: Sequence[str], subjects: Optional[Sequence[int]] = None) -> list[dict]:
    """Every (subject, variant, trial, sample) of the evaluation split, in a fixed order."""
    ec = cfg.eval
    idx = recording.splits.get(ec.split)
    if idx is None:
        raise DataError(f"{recording.source}: no '{ec.split}' split to reconstruct")
    subs = recording.subjects[idx]
    present = sorted(set(int(s) for s in subs))
    wanted = list(subjects) if subjects else (list(ec.subjects) if ec.subjects else present)
    missing = [s for s in wanted if s not in present]
    if missing:
        raise ConfigError(f"--subjects: subject {missing[0]} has no trials in the '{ec.split}' split "
                          f"(present: {', '.join(map(str, present))})")
    rows = []
    for s in wanted:
        trials = [int(j) for j in idx[subs == s]]
        if ec.max_trials is not None:
            trials = trials[: ec.max_trials]
        labels = {j: int(recording.labels[j]) for j in trials}
        for vname in variants:
            v = ec.variant(vname)
            for j in trials:
                eeg_item = j
                if v.eeg == "other_class":
                    others = [k for k in trials if labels[k] != labels[j]]
                    if not others:
                        raise DataError(f"variant '{vname}': subject {s} has no trial of another class in the "
                                        f"'{ec.split}' split")
                    rng = np.random.default_rng([cfg.seed, j, 991])
                    eeg_item = others[int(rng.integers(len(others)))]
                for k in range(cfg.ldm.samples_per_eeg):
                    rows.append({
                        "subject": str(s), "variant": vname, "item": j, "eeg_item": eeg_item, "sample": k,
                        "seed": row_seed(cfg.seed, j, k), "stem": recording.stems[j], "label": labels[j],
                        "class_name": recording.class_names[labels[j]],
                        "gt": recording.image_paths[j] or "",
                    })
    return rows


def rows_to_batch(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    """A list of row dicts -> a column batch (the format Ray Data hands to the callables)."""
    out = {}
    for k in rows[0]:
        vals = [r[k] for r in rows]
        out[k] = np.asarray(vals, dtype=object) if isinstance(vals[0], str) else np.asarray(vals)
    return out


def _model(run_dir: Path, record: dict, stage: str, module: str):
    from neuroimagen.stages.encoder import build_from_spec
    from neuroimagen.training.checkpoint import load_model_dir

    entry = record["stages"].get(stage)
    if entry is None:
        raise ConfigError(f"{run_dir}: stage '{stage}' is not trained; run `neuroimagen train --out {run_dir} "
                          f"--stages {stage}` (or `neuroimagen reconstruct`, which trains what is missing)")
    doc, states = load_model_dir(run_dir / entry["model"])
    m = build_from_spec(doc["modules"][module])
    m.load_state_dict(states[module])
    return m.eval().requires_grad_(False), doc["modules"][module]


class Decode:
    """Rows -> ``init`` (B, 3, r, r) in [0, 1] at the saliency resolution (zeros for noise), ``init_kind``,
    ``prompt`` (B, L, E): the prompt embedding of the row's variant. CPU; models loaded once."""

    def __init__(self, run_dir: str, cfg: dict, variants: Sequence[str]):
        from neuroimagen.config import Config, from_dict
        from neuroimagen.data.datasets import load_recording
        from neuroimagen.stages.semantic import text_encoder_for
        from neuroimagen.runs.training import read_run

        self.cfg = cfg = from_dict(Config, cfg)
        self.run_dir = Path(run_dir)
        record = read_run(self.run_dir)
        self.defs = {v: cfg.eval.variant(v) for v in variants}
        need = needed_stages(cfg, variants)
        self.encoder = self.generator = None
        self.z_dim = cfg.stages.saliency.z_dim
        self.res = cfg.stages.saliency.resolution
        if "saliency" in need:
            self.encoder, _ = _model(self.run_dir, record, "encoder", "encoder")
            self.generator, spec = _model(self.run_dir, record, "saliency", "generator")
            self.z_dim, self.res = spec["kwargs"]["z_dim"], spec["kwargs"]["resolution"]
        self.regressors = {kind: _model(self.run_dir, record, stage, "regressor")[0]
                           for kind, stage in SEMANTIC_STAGE.items() if stage in need}
        self.recording = load_recording(cfg.data, check_images=False)
        self.text = text_encoder_for(cfg)
        self.empty = self.text.encode([""])[0]  # (L, E)
        self._true: dict[str, torch.Tensor] = {}

    def _true_embedding(self, caption: str) -> torch.Tensor:
        if caption not in self._true:
            self._true[caption] = self.text.encode([caption])[0]
        return self._true[caption]

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        from neuroimagen.data.captions import label_caption
        from neuroimagen.data.datasets import load_image
        from neuroimagen.models.saliency_gan import sample_z

        rec = self.recording
        B = len(batch["item"])
        init = torch.zeros(B, 3, self.res, self.res)
        prompt = self.empty.expand(B, *self.empty.shape).clone()
        kinds = []
        eeg = torch.stack([rec.segment(int(j)) for j in batch["eeg_item"]])  # (B, C, T)
        feats = self.encoder(eeg) if self.encoder is not None else None
        preds = {kind: m(eeg) for kind, m in self.regressors.items()}  # (B, L, E) each
        for i in range(B):
            v = self.defs[str(batch["variant"][i])]
            kinds.append(v.init)
            if v.init == "saliency":
                z = sample_z(1, self.z_dim, generator=torch.Generator().manual_seed(int(batch["seed"][i])))
                init[i] = (self.generator(z, feats[i: i + 1])[0] + 1) / 2
            elif v.init == "gt":
                init[i] = load_image(str(batch["gt"][i]), self.res)
            if v.semantics in ("label", "image"):
                prompt[i] = preds[v.semantics][i]
            elif v.semantics == "true_label":
                prompt[i] = self._true_embedding(label_caption(rec.class_names[int(batch["label"][i])]))
            elif v.semantics == "true_image":
                if rec.captions is None or str(batch["stem"][i]) not in rec.captions:
                    raise DataError(f"variant '{v.name}': no per-image caption for '{batch['stem'][i]}' (data.captions)")
                prompt[i] = self._true_embedding(rec.captions[str(batch["stem"][i])])
        out = dict(batch)
        out["init"] = init.clamp(0, 1).numpy().astype(np.float32)
        out["init_kind"] = np.asarray(kinds, dtype=object)
        out["prompt"] = prompt.numpy().astype(np.float32)
        return out


class Generate:
    """Rows with ``init``/``init_kind``/``prompt`` -> ``image`` (B, 3, R, R) in [0, 1]; drops ``prompt``.

    The pipeline is loaded once per instance (per Ray actor) from a snapshot directory.
    """

    def __init__(self, snapshot: str, ldm: dict, device: str = "cpu", threads: int = 0,
                 fault_batch: Optional[int] = None, fault_marker: Optional[str] = None):
        from neuroimagen.models.ldm import load_img2img, text2img_from
        from neuroimagen.models.text_encoder import TextEncoder

        if threads:
            torch.set_num_threads(int(threads))
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("eval.use_gpu: true, but this worker has no CUDA device")
        self.ldm = ldm
        self.pipe = load_img2img(snapshot, device=device, dtype=ldm["dtype"], attention_slicing=ldm["attention_slicing"],
                                 attention=ldm.get("attention", "sdpa"))
        self.t2i = text2img_from(self.pipe)
        te = TextEncoder(self.pipe.tokenizer, self.pipe.text_encoder, identity=snapshot)
        self.empty = te.encode([""])[0]  # (L, E): the negative prompt of classifier-free guidance
        # testing hook (eval.fault_injection_batch): this process dies on its Nth batch, once per run
        self.fault_batch, self.fault_marker, self.calls = fault_batch, fault_marker, 0

    def __call__(self, batch: dict) -> dict:
        from neuroimagen.models.ldm import img2img, pipeline_resolution, text2img

        if self.fault_batch is not None and self.calls == self.fault_batch:
            from neuroimagen.training.loop import kill_once

            kill_once(Path(self.fault_marker))
        self.calls += 1

        kinds = np.asarray(batch["init_kind"]).astype(str)
        prompt = torch.from_numpy(np.asarray(batch["prompt"], dtype=np.float32))  # (B, L, E)
        if prompt.shape[1:] != self.empty.shape:
            raise ConfigError(f"prompt embeddings are {tuple(prompt.shape[1:])} but the diffusion model's text encoder "
                              f"gives {tuple(self.empty.shape)}: train stage 3 with the LDM's own text encoder")
        init = torch.from_numpy(np.asarray(batch["init"], dtype=np.float32))
        seeds = [int(s) for s in batch["seed"]]
        R = pipeline_resolution(self.pipe)
        images = torch.zeros(len(seeds), 3, R, R)
        neg = self.empty.expand(len(seeds), *self.empty.shape)
        lc = self.ldm
        for noise, sel in ((False, np.flatnonzero(kinds != "noise")), (True, np.flatnonzero(kinds == "noise"))):
            if len(sel) == 0:
                continue
            t = torch.from_numpy(sel)
            s = [seeds[i] for i in sel]
            if noise:
                images[t] = text2img(self.t2i, prompt[t], neg[t], s, lc["guidance_scale"], lc["num_inference_steps"])
            else:
                images[t] = img2img(self.pipe, init[t], prompt[t], neg[t], s, lc["strength"], lc["guidance_scale"],
                                    lc["num_inference_steps"])
        out = {k: v for k, v in batch.items() if k != "prompt"}
        out["image"] = images.numpy().astype(np.float32)
        return out


class Reconstruct:
    """Decode -> Generate -> Score in one callable: a batch's whole journey in one process. The local loop
    runs it, and so does every actor of Ray Data's ``fused`` layout (the batch never crosses the object store
    between steps, and no two actors compete for the same cores)."""

    def __init__(self, decode_kw: dict, gen_kw: dict, score_kw: dict):
        from neuroimagen.metrics.scoring import Score

        self.decode, self.generate, self.score = Decode(**decode_kw), Generate(**gen_kw), Score(**score_kw)

    def __call__(self, batch: dict) -> dict:
        return self.score(self.generate(self.decode(batch)))
