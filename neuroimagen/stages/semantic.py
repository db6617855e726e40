"""Stage 3: EEG -> caption embedding regressor (NeuroImagen eq. 7), loss ||h - h_caption||^2.

Targets are the text encoder's ``last_hidden_state`` of each item's caption: the label caption
("An image of <name>") or the per-image caption (BLIP, or the twin's attribute captions). They are
computed once on the driver (``build_targets``) and cached in one file per run keyed by the encoder
and the caption set.

Validation: ``val_std_mse``, the training objective itself (eq. 7 in standardised target units: the mean
of ((h - t) / std)^2 with the per-element std of the training targets), which selects the exported epoch
and is what sweeps optimise; ``val_mse`` in the text encoder's raw units (reported only: CLIP-L's few
channels of huge variance dominate it, so it would select for those channels alone); cosine similarity;
and the nearest-class rate — the fraction of validation items whose prediction is closest (Euclidean,
flattened) to their own class's prototype: the label-caption embedding (label captions) or the mean
per-image-caption embedding of the class's training images (per-image captions). Beside it, the shuffled-EEG
control ``val_nearest_class_shuffled``: the same rate with the EEG permuted across validation trials (a seeded
derangement: every trial scored on another trial's EEG), which sits near chance; ``SemanticStage.guards`` flags a
regressor that does not beat it (``ignores_eeg``).

The exported regressor's spec records the text encoder its targets came from (``targets``: identity and
weight fingerprint), so that reconstruction can refuse a diffusion model with another text encoder
(``neuroimagen.reconstruction.factory.check_text_encoder``).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from neuroimagen.atomic import atomic_dir, atomic_path
from neuroimagen.models.text_encoder import build_tiny_text_encoder, load_text_encoder
from neuroimagen.stages.base import Stage, TensorBatches, batched, describe_split, shuffled_index
from neuroimagen.stages.encoder import build_from_spec, init_from_stage1
from neuroimagen.training.context import unwrap
from neuroimagen.training.samplers import GlobalBatchSampler


def text_encoder_for(cfg, run_dir: Path | None = None):
    """The configured text encoder: a local pretrained one, or the tiny in-code one (saved into the run)."""
    tc = cfg.text_encoder
    if tc.pretrained is not None:
        return load_text_encoder(tc.pretrained)
    te = build_tiny_text_encoder(seed=cfg.seed, hidden_size=tc.hidden_size, num_layers=tc.num_layers,
                                 num_heads=tc.num_heads, max_length=tc.max_length)
    if run_dir is not None and not (run_dir / "text_encoder" / "text_encoder").is_dir():
        with atomic_dir(run_dir / "text_encoder", overwrite=True) as stage:
            te.save(stage)
    return te


def build_targets(cfg, splits: dict, run_dir: Path, kind: str = "label") -> dict:
    """Caption tables and per-item caption indices for train/val, cached under ``<run>/semantic/``.

    Returns {'table': (n, L, E), 'captions': [...], 'index': {split: (N,) long}, 'prototypes': (K, L, E),
    'identity': str, 'fingerprint': the text encoder's weight hash, 'kind': 'label'|'image', 'cache': path}.
    """
    if kind not in ("label", "image"):
        raise ValueError(f"kind: expected 'label' or 'image', got {kind!r}")
    rec = splits["train"].recording
    label_caps = rec.label_captions()
    per_item = {s: splits[s].captions(kind) for s in ("train", "val")}
    captions = label_caps if kind == "label" else sorted({c for caps in per_item.values() for c in caps})
    te = text_encoder_for(cfg, run_dir)
    key = hashlib.sha256(json.dumps([te.identity, kind, captions, label_caps]).encode()).hexdigest()[:16]
    cache = run_dir / ("semantic" if kind == "label" else "semantic_image") / f"targets-{key}.pt"
    if cache.is_file():
        stored = torch.load(cache, map_location="cpu", weights_only=True)
        table, label_table = stored["table"], stored["label_table"]
    else:
        table = te.encode(captions)  # (n, L, E)
        label_table = table if kind == "label" else te.encode(label_caps)  # (K, L, E)
        with atomic_path(cache) as tmp:
            torch.save({"identity": te.identity, "kind": kind, "captions": captions, "table": table,
                        "label_table": label_table}, tmp)
    pos = {c: i for i, c in enumerate(captions)}
    index = {s: torch.tensor([pos[c] for c in per_item[s]], dtype=torch.long) for s in per_item}
    if kind == "label":
        prototypes = label_table
    else:  # mean per-image-caption embedding of each class's training images
        y = splits["train"].labels
        t = table[index["train"]]  # (N, L, E)
        prototypes = torch.stack([t[y == k].mean(0) if (y == k).any() else torch.zeros_like(t[0])
                                  for k in range(rec.num_classes)])
    return {"table": table, "captions": captions, "index": index, "prototypes": prototypes,
            "label_table": label_table, "identity": te.identity, "fingerprint": te.fingerprint, "kind": kind,
            "cache": str(cache)}


def semantic_spec(sc, enc_name: str, n_chans: int, n_times: int, tokens: int, token_dim: int) -> dict:
    return {"builder": "semantic", "kwargs": {"n_chans": n_chans, "n_times": n_times, "tokens": tokens,
                                              "token_dim": token_dim, "encoder": enc_name, "embed_dim": sc.embed_dim,
                                              "width": sc.width, "hidden": sc.hidden, "dropout": sc.dropout}}


def nearest_class_rate(pred: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predictions (N, L, E) nearest (Euclidean, flattened) to their class prototype (K, L, E)."""
    d = torch.cdist(pred.flatten(1).double(), prototypes.flatten(1).double())  # (N, K)
    return float((d.argmin(1) == labels).double().mean())


class SemanticStage(Stage):
    name = "semantic"
    config_section = "semantic"
    caption_kind = "label"
    select_metric = "val_std_mse"
    select_mode = "min"
    protocol = ("val_std_mse = MSE to the {cap} caption embeddings of the validation split in standardised units (per "
                "element, minus the training targets' mean, over their std: the training objective, eq. 7); val_mse = "
                "the same MSE in the text encoder's raw units (reported only); cosine similarity of the flattened "
                "embeddings; nearest-class rate = fraction of validation items closest (Euclidean) to their class "
                "prototype; val_nearest_class_shuffled = the same with the EEG permuted across validation trials "
                "(seeded derangement), the shuffled-EEG control; model selected on val_std_mse")

    @classmethod
    def guards(cls, data: dict, val_metrics: dict) -> dict:
        """``ignores_eeg``: the nearest-class rate does not beat the shuffled-EEG control by more than two binomial
        standard errors of a rate at the control's level on the validation split (at least one item)."""
        acc, control = val_metrics.get("val_nearest_class_acc"), val_metrics.get("val_nearest_class_shuffled")
        n = int((data.get("val") or {}).get("n") or 0)
        if acc is None or control is None or n < 2:
            return {}
        tol = max(1.0 / n, 2 * math.sqrt(control * (1 - control) / n))
        fired = acc - control <= tol
        reason = (f"the regressor's nearest-class rate {acc:.3g} is not above the shuffled-EEG control {control:.3g} by more than "
                  f"{tol:.3g}" if fired else "")
        return {"ignores_eeg": {"nearest_class": acc, "nearest_class_shuffled": control, "gain": acc - control,
                                "tolerance": tol, "n": n, "fired": bool(fired), "reason": reason}}

    def __init__(self, cfg, ctx, inputs):
        super().__init__(cfg, ctx, inputs)
        sc = cfg.stages.semantic
        self.sc = sc
        splits, targets = inputs["splits"], inputs["targets"]
        train, val = splits["train"], splits["val"]
        self.x_train, self.x_val = train.eeg_tensor(), val.eeg_tensor()  # (N, C, T)
        table = targets["table"]  # (n, L, E)
        self.t_train = table[targets["index"]["train"]]  # (N, L, E)
        self.t_val = table[targets["index"]["val"]]
        self.y_val = val.labels
        self.shuffle_val = shuffled_index(len(self.y_val), cfg.seed + 47)  # (M,): the shuffled-EEG control
        self.prototypes = targets["prototypes"]
        C, T = self.x_train.shape[1:]
        L, E = table.shape[1:]
        enc_name = sc.encoder or cfg.stages.encoder.name
        # which text encoder's space the regressor predicts in (checked against the LDM's at reconstruction)
        self._specs = {"regressor": {**semantic_spec(sc, enc_name, C, T, L, E),
                                     "targets": {"captions": targets["kind"], "text_encoder": targets["identity"],
                                                 "text_encoder_fingerprint": targets["fingerprint"]}}}
        torch.manual_seed(cfg.seed + 3)  # identical initial weights on every rank
        model = build_from_spec(self._specs["regressor"])
        model.set_target_stats(self.t_train)
        self.init_note = init_from_stage1(model.encoder, inputs, sc, enc_name, C, T)
        self.model = ctx.wrap(model)
        self._modules = {"regressor": self.model}
        self._optimizers = {"regressor": torch.optim.Adam(self.model.parameters(), lr=sc.lr, weight_decay=sc.weight_decay)}
        bs = min(sc.batch_size, max(1, self.x_train.shape[0] // ctx.world_size))
        self.sampler = GlobalBatchSampler(self.x_train.shape[0], bs, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size)
        self.loader = TensorBatches({"eeg": self.x_train, "target": self.t_train}, self.sampler, ctx.device)
        self._data_desc = {"train": describe_split(train), "val": describe_split(val), "captions": targets["kind"],
                           "text_encoder": targets["identity"], "text_encoder_fingerprint": targets["fingerprint"],
                           "targets_cache": targets["cache"], "init": self.init_note}

    def train_step(self, batch: dict) -> dict[str, float]:
        opt = self._optimizers["regressor"]
        std = unwrap(self.model).target_std  # (L, E)
        with self.ctx.autocast():
            h = self.model(batch["eeg"])  # (B, L, E), through DDP so gradients are averaged
        # eq. 7 in standardised target units (see SemanticRegressor): mean of ((h - t) / std)^2
        loss = F.mse_loss(h.float() / std, batch["target"] / std)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"std_mse": float(loss.detach())}

    def validate(self) -> dict[str, float]:
        if self.x_val.shape[0] == 0:
            return {"val_std_mse": float("nan"), "val_mse": float("nan")}
        pred = batched(self.model, self.x_val, self.ctx.device)  # (M, L, E)
        std = unwrap(self.model).target_std.float().cpu()  # (L, E), the training targets' (as in train_step)
        cos = F.cosine_similarity(pred.flatten(1), self.t_val.flatten(1), dim=1)
        return {"val_std_mse": float(F.mse_loss(pred / std, self.t_val / std)),
                "val_mse": float(F.mse_loss(pred, self.t_val)), "val_cosine": float(cos.mean()),
                "val_nearest_class_acc": nearest_class_rate(pred, self.prototypes, self.y_val),
                # h is per trial (eval mode), so h of the permuted EEG is the permuted h
                "val_nearest_class_shuffled": nearest_class_rate(pred[self.shuffle_val], self.prototypes, self.y_val)}


class SemanticImageStage(SemanticStage):
    """The same regressor on per-image captions (the paper's B); its targets come with ``kind='image'``."""

    name = "semantic_image"
    caption_kind = "image"
