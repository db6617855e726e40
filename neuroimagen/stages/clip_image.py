"""Optional stage ``clip_image``: EEG aligned to the CLIP image embeddings of the stimuli (NICE / ATM).

An EEG encoder (one of the registry's, ``stages.clip_image.encoder``) and a projection map each EEG trial into
the image-embedding space of a frozen CLIP vision model (``stages.clip_image.clip_vision``: a local folder in the
transformers layout, or the tiny in-code model). The image embeddings of every training and validation stimulus
are computed once on the driver (``build_image_targets``) and cached under ``<run>/clip_image/``. The loss is the
symmetric InfoNCE of CLIP (:func:`neuroimagen.losses.clip_loss`) over the global batch, with a learnable
temperature (logit scale ``log(1/T)``, clamped to ``[0, log 100]`` after every step, as CLIP does).

Duplicates: one image has several rows (its subjects' EEG; its repetitions when they are not averaged). Two rows
of one image in a batch would make each other's image a false negative, so batches are drawn by
:class:`~neuroimagen.training.samplers.DistinctGroupBatchSampler`: no image twice in a global batch (under DDP the
whole global batch, which every rank gathers for the loss).

Validation (validation split only): each validation EEG ranks the gallery of the CLIP embeddings of every
validation image (cosine similarity; exact, every other image a candidate): ``val_top1`` (selects the exported
epoch and is what sweeps optimise) and ``val_top5`` (gallery > 5), chance ``1 / gallery``; beside them the
shuffled-EEG control ``val_top1_shuffled`` (the EEG permuted across validation trials, a seeded derangement),
which sits near chance; ``ClipImageStage.guards`` flags a model that does not beat it (``ignores_eeg``).

The exported model's spec records the vision model its targets came from (identity and weight fingerprint), so
that ``neuroimagen retrieval`` refuses to rank a test gallery embedded by another one.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from neuroimagen.atomic import atomic_path
from neuroimagen.data.recording import load_image
from neuroimagen.errors import ConfigError
from neuroimagen.losses import clip_loss
from neuroimagen.metrics.retrieval import cosine_similarity, retrieval_hits
from neuroimagen.models.feature_nets import FeatureNet, build_tiny_clip_vision, load_clip_vision
from neuroimagen.stages.base import Stage, TensorBatches, batched, describe_split, shuffled_index
from neuroimagen.stages.encoder import build_from_spec, init_from_stage1
from neuroimagen.training.context import unwrap
from neuroimagen.training.samplers import DistinctGroupBatchSampler

_VISION_CACHE: dict[tuple, tuple[FeatureNet, str]] = {}


def vision_fingerprint(fn: FeatureNet) -> str:
    """``sha256:<16 hex>`` of every parameter of the vision model (name, dtype, shape, bytes; sorted by name)."""
    h = hashlib.sha256()
    for name, p in sorted(fn.body.named_parameters()):
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def clip_vision_for(cfg) -> tuple[FeatureNet, str]:
    """(the configured CLIP vision model, its weight fingerprint): a local folder, or the tiny in-code one (seeded by
    ``cfg.seed``). Loaded once per process."""
    sc = cfg.stages.clip_image
    tiny = sc.clip_vision in (None, "tiny")
    key = ("tiny", cfg.seed, sc.tiny_dim) if tiny else ("folder", str(Path(sc.clip_vision).expanduser().resolve()))
    if key not in _VISION_CACHE:
        fn = build_tiny_clip_vision(seed=cfg.seed, dim=sc.tiny_dim) if tiny else \
            load_clip_vision(key[1], base_resolution=None)
        _VISION_CACHE[key] = (fn, vision_fingerprint(fn))
    return _VISION_CACHE[key]


def embed_images(fn: FeatureNet, paths: list[str], batch: int = 32) -> torch.Tensor:
    """CLIP image embeddings (n, P) of the image files ``paths`` (short side resized to the model's resolution and
    centre-cropped, as CLIP preprocesses)."""
    out = []
    for i in range(0, len(paths), batch):
        images = torch.stack([load_image(p, fn.resolution) for p in paths[i: i + batch]])
        out.append(fn(images)["clip"])
    return torch.cat(out) if out else torch.empty(0)


def split_images(ds) -> tuple[list[str], list[str]]:
    """(stems of the split's distinct images in first-seen order, their image paths)."""
    rec, stems, paths, seen = ds.recording, [], [], set()
    for j in ds.indices:
        s = rec.stems[int(j)]
        if s not in seen:
            seen.add(s)
            stems.append(s)
            paths.append(rec.image_paths[int(j)])
    if any(p is None for p in paths):
        raise ConfigError("data.images: not set; stage clip_image embeds the stimulus images with CLIP")
    return stems, paths


def build_image_targets(cfg, splits: dict, run_dir: Path) -> dict:
    """The CLIP image embeddings of every training and validation image, cached under ``<run>/clip_image/``.

    Returns {'table': (n, P), 'stems': [...], 'index': {split: (N,) long row -> table row}, 'mean': (P,) the
    training images' mean, 'identity', 'fingerprint', 'cache'}.
    """
    fn, fingerprint = clip_vision_for(cfg)
    stems, paths, seen = [], [], set()
    for s in ("train", "val"):
        for a, b in zip(*split_images(splits[s])):
            if a not in seen:
                seen.add(a)
                stems.append(a)
                paths.append(b)
    key = hashlib.sha256(json.dumps([fn.identity, fingerprint, fn.resolution, stems, paths]).encode()).hexdigest()[:16]
    cache = run_dir / "clip_image" / f"image-embeds-{key}.pt"
    if cache.is_file():
        table = torch.load(cache, map_location="cpu", weights_only=True)["table"]
    else:
        table = embed_images(fn, paths)  # (n, P)
        with atomic_path(cache) as tmp:
            torch.save({"identity": fn.identity, "fingerprint": fingerprint, "stems": stems, "table": table}, tmp)
    pos = {s: i for i, s in enumerate(stems)}
    index = {s: torch.tensor([pos[t] for t in splits[s].stems], dtype=torch.long) for s in ("train", "val")}
    train_rows = sorted(set(index["train"].tolist()))
    mean = table[train_rows].mean(0) if train_rows else torch.zeros(table.shape[1])
    return {"table": table, "stems": stems, "index": index, "mean": mean, "identity": fn.identity,
            "fingerprint": fingerprint, "cache": str(cache)}


def clip_spec(sc, enc_name: str, n_chans: int, n_times: int, proj_dim: int) -> dict:
    return {"builder": "clip_eeg", "kwargs": {"n_chans": n_chans, "n_times": n_times, "proj_dim": proj_dim,
                                              "encoder": enc_name, "embed_dim": sc.embed_dim, "width": sc.width,
                                              "dropout": sc.dropout, "temperature": sc.temperature}}


def gallery_top(similarity: torch.Tensor, true_index: torch.Tensor, top: int) -> float:
    """Exact top-``top`` rate of ranking the whole gallery (every other item a candidate; ties count against)."""
    g = similarity.shape[1]
    return float(retrieval_hits(similarity, true_index, k=g, top=top, draws=1).mean())


class ClipImageStage(Stage):
    name = "clip_image"
    config_section = "clip_image"
    select_metric = "val_top1"
    select_mode = "max"
    protocol = ("val_top1 / val_top5 = each validation EEG ranks the CLIP image embeddings of every validation image "
                "(the whole validation gallery, cosine similarity, ties count against; images centred on the "
                "training images' mean embedding: {sc.center_targets}); val_top1_shuffled = the same with the EEG "
                "permuted across validation trials (seeded derangement), the shuffled-EEG control; chance = 1 / "
                "gallery; trained with the symmetric InfoNCE over global batches of distinct images; model "
                "selected on val_top1")

    @classmethod
    def chance(cls, data: dict, val_metrics: dict) -> dict:
        g = int(data.get("val_gallery") or 0)
        return {"chance": 1.0 / g if g else float("nan"), "val_gallery": g}

    @classmethod
    def guards(cls, data: dict, val_metrics: dict) -> dict:
        """``ignores_eeg``: val_top1 does not beat the shuffled-EEG control by more than two binomial standard errors
        of a rate at the control's level on the validation split (at least one item)."""
        acc, control = val_metrics.get("val_top1"), val_metrics.get("val_top1_shuffled")
        n = int((data.get("val") or {}).get("n") or 0)
        if acc is None or control is None or n < 2 or math.isnan(acc) or math.isnan(control):
            return {}
        tol = max(1.0 / n, 2 * math.sqrt(control * (1 - control) / n))
        fired = acc - control <= tol
        reason = (f"validation top-1 {acc:.3g} is not above the shuffled-EEG control {control:.3g} by more than "
                  f"{tol:.3g}" if fired else "")
        return {"ignores_eeg": {"top1": acc, "top1_shuffled": control, "gain": acc - control, "tolerance": tol,
                                "n": n, "fired": bool(fired), "reason": reason}}

    def __init__(self, cfg, ctx, inputs):
        super().__init__(cfg, ctx, inputs)
        sc = cfg.stages.clip_image
        self.sc = sc
        splits, targets = inputs["splits"], inputs["clip_targets"]
        train, val = splits["train"], splits["val"]
        self.x_train, self.x_val = train.eeg_tensor(), val.eeg_tensor()  # (N, C, T), (M, C, T)
        self.g_train, g_val = targets["index"]["train"], targets["index"]["val"]  # table rows of each trial's image
        table = targets["table"].float()  # (n, P)
        C, T = self.x_train.shape[1:]
        P = table.shape[1]
        enc_name = sc.encoder or cfg.stages.encoder.name
        self._specs = {"clip_eeg": {**clip_spec(sc, enc_name, C, T, P),
                                    "targets": {"clip_vision": targets["identity"],
                                                "clip_vision_fingerprint": targets["fingerprint"],
                                                "center": sc.center_targets}}}
        torch.manual_seed(cfg.seed + 5)  # identical initial weights on every rank
        model = build_from_spec(self._specs["clip_eeg"])
        model.set_target_mean(targets["mean"] if sc.center_targets else torch.zeros(P))
        self.init_note = init_from_stage1(model.encoder, inputs, sc, enc_name, C, T)
        if not sc.learn_temperature:
            model.logit_scale.requires_grad_(False)
        self.images = model.image_space(table).to(ctx.device)  # (n, P): what the EEG is aligned to
        self.model = ctx.wrap(model)
        self._modules = {"clip_eeg": self.model}
        self._optimizers = {"clip_eeg": torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                                          lr=sc.lr, weight_decay=sc.weight_decay)}
        distinct = len(set(self.g_train.tolist()))
        bs = min(sc.batch_size, max(1, distinct // ctx.world_size))
        self.sampler = DistinctGroupBatchSampler(self.g_train, bs, seed=cfg.seed, rank=ctx.rank,
                                                 world_size=ctx.world_size)
        self.loader = TensorBatches({"eeg": self.x_train, "image": self.g_train}, self.sampler, ctx.device)
        # validation gallery: every distinct validation image once; each trial's true item in it
        gallery = sorted(set(g_val.tolist()))
        self.val_gallery = self.images[gallery].cpu()  # (G, P)
        where = {g: i for i, g in enumerate(gallery)}
        self.val_true = torch.tensor([where[int(g)] for g in g_val], dtype=torch.long)  # (M,)
        self.shuffle_val = shuffled_index(len(self.val_true), cfg.seed + 61)
        self._data_desc = {"train": describe_split(train), "val": describe_split(val), "val_gallery": len(gallery),
                           "train_images": distinct, "clip_vision": targets["identity"],
                           "clip_vision_fingerprint": targets["fingerprint"], "targets_cache": targets["cache"],
                           "init": self.init_note, "batches": "distinct images per global batch"}

    def train_step(self, batch: dict) -> dict[str, float]:
        opt = self._optimizers["clip_eeg"]
        with self.ctx.autocast():
            z, scale = self.model(batch["eeg"], with_scale=True)  # (B_r, P): this rank's share of the global batch
        # every rank gathers the global batch (distinct images) and computes the same loss on it; DDP's averaging
        # then gives that loss's gradient (as stage 1's mining)
        z_all, ids = self.ctx.gather(z.float()), self.ctx.gather(batch["image"])  # (B, P), (B,)
        loss = clip_loss(z_all, self.images[ids], scale.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        unwrap(self.model).clamp_scale()
        return {"infonce": float(loss.detach()), "temperature": float(1.0 / scale.detach())}

    def validate(self) -> dict[str, float]:
        if self.x_val.shape[0] == 0 or self.val_gallery.shape[0] < 2:
            return {"val_top1": float("nan")}
        z = batched(self.model, self.x_val, self.ctx.device)  # (M, P)
        sim = cosine_similarity(z, self.val_gallery)  # (M, G)
        out = {"val_top1": gallery_top(sim, self.val_true, 1),
               # embeddings are per trial (eval mode): those of the permuted EEG are the permuted embeddings
               "val_top1_shuffled": gallery_top(sim[self.shuffle_val], self.val_true, 1),
               "val_temperature": float(1.0 / unwrap(self.model).logit_scale.detach().exp())}
        if self.val_gallery.shape[0] > 5:
            out["val_top5"] = gallery_top(sim, self.val_true, 5)
        return out
