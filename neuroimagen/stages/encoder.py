"""Stage 1: the EEG encoder f_theta, trained with the triplet loss (NeuroImagen eq. 1).

Batches are class-balanced (P classes x K samples, no trial twice) so every anchor has positives;
mining is batch-all, semi-hard or batch-hard (hardest negative = the closest). With
``stages.encoder.triplet_normalize`` (the default) the margin is measured on unit-norm embeddings, which an
encoder cannot satisfy by inflating its output norms; the features f_theta(x) handed to stage 2 are unit-norm
only with ``stages.encoder.l2_normalize``.
Under DDP one global P x K batch is drawn and sharded over the ranks, and the triplets are mined
over the gathered global batch: W workers train exactly like one worker with W times the classes.
Validation: k-NN top-1 accuracy of validation embeddings against training embeddings, and k-means
clustering accuracy.
"""

from __future__ import annotations

import torch

from neuroimagen.losses import triplet_loss
from neuroimagen.metrics.embedding import clustering_accuracy, knn_accuracy
from neuroimagen.models.clip_image import ClipEEGModel
from neuroimagen.models.eeg_encoders import build_encoder
from neuroimagen.models.saliency_gan import Discriminator, Generator
from neuroimagen.models.semantic import SemanticRegressor
from neuroimagen.stages.base import Stage, TensorBatches, batched, describe_split
from neuroimagen.training.samplers import BalancedBatchSampler


def encoder_spec(sc, n_chans: int, n_times: int) -> dict:
    """The builder + kwargs that recreate the stage-1 encoder (stored in checkpoints and model.json)."""
    return {"builder": "eeg_encoder", "kwargs": {"name": sc.name, "n_chans": n_chans, "n_times": n_times,
                                                 "embed_dim": sc.embed_dim, "width": sc.width, "dropout": sc.dropout,
                                                 "l2_normalize": sc.l2_normalize}}


def build_from_spec(spec: dict) -> torch.nn.Module:
    """Recreate a module from a spec written by a stage (``eeg_encoder``, ``generator``, ``semantic``, ``clip_eeg``)."""
    kw = dict(spec["kwargs"])
    if spec["builder"] == "eeg_encoder":
        return build_encoder(kw.pop("name"), **kw)
    if spec["builder"] == "generator":
        return Generator(**kw)
    if spec["builder"] == "discriminator":
        return Discriminator(**kw)
    if spec["builder"] == "semantic":
        return SemanticRegressor(**kw)
    if spec["builder"] == "clip_eeg":
        return ClipEEGModel(**kw)
    raise ValueError(f"unknown builder {spec['builder']!r}")


def init_from_stage1(encoder: torch.nn.Module, inputs: dict, sc, enc_name: str, n_chans: int, n_times: int) -> str:
    """Load the stage-1 encoder's weights into a later stage's ``encoder`` when ``sc.init_from_encoder`` and the
    architecture (name, width, embed_dim, channels, samples) matches; returns the note the stage records."""
    spec, state = inputs.get("encoder_spec"), inputs.get("encoder_state")
    if not sc.init_from_encoder or spec is None:
        return "random init"
    k = spec["kwargs"]
    if (k["name"], k["width"], k["embed_dim"], k["n_chans"], k["n_times"]) != (enc_name, sc.width, sc.embed_dim, n_chans, n_times):
        return "random init (stage-1 encoder architecture differs)"
    encoder.load_state_dict(state)
    return f"encoder initialised from {inputs.get('encoder_path')}"


class EncoderStage(Stage):
    name = "encoder"
    config_section = "encoder"
    select_metric = "val_knn_acc"
    select_mode = "max"
    protocol = ("k-NN (k={sc.knn_k}, Euclidean) top-1 accuracy of validation-split embeddings against training-split "
                "embeddings; k-means (K=classes in the validation split, 10 inits) accuracy after Hungarian matching on the validation split; "
                "model selected on val_knn_acc")

    def __init__(self, cfg, ctx, inputs):
        super().__init__(cfg, ctx, inputs)
        sc = cfg.stages.encoder
        self.sc = sc
        splits = inputs["splits"]
        train, val = splits["train"], splits["val"]
        self.x_train, self.y_train = train.eeg_tensor(), train.labels  # (N, C, T), (N,)
        self.x_val, self.y_val = val.eeg_tensor(), val.labels
        self.num_classes = train.num_classes
        self.val_classes = max(1, len(set(self.y_val.tolist())))
        C, T = self.x_train.shape[1:]
        self._specs = {"encoder": encoder_spec(sc, C, T)}
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = ctx.wrap(build_from_spec(self._specs["encoder"]))
        self._modules = {"encoder": self.model}
        self._optimizers = {"encoder": torch.optim.Adam(self.model.parameters(), lr=sc.lr, weight_decay=sc.weight_decay)}
        self.sampler = BalancedBatchSampler(self.y_train, sc.classes_per_batch, sc.samples_per_class, seed=cfg.seed,
                                            rank=ctx.rank, world_size=ctx.world_size)
        self.loader = TensorBatches({"eeg": self.x_train, "label": self.y_train}, self.sampler, ctx.device)
        self._data_desc = {"train": describe_split(train), "val": describe_split(val)}

    def train_step(self, batch: dict) -> dict[str, float]:
        opt = self._optimizers["encoder"]
        with self.ctx.autocast():
            emb = self.model(batch["eeg"])  # (B_r, D): this rank's share of the global P x K batch
        # Mine the global batch: every rank gathers all embeddings (gradients flow back to its own rows) and
        # computes the same loss, which DDP's gradient averaging turns into that loss's exact gradient.
        emb_all, labels = self.ctx.gather(emb.float()), self.ctx.gather(batch["label"])  # (B, D), (B,)
        loss, stats = triplet_loss(emb_all, labels, self.sc.margin, self.sc.mining, self.sc.squared,
                                   normalize=self.sc.triplet_normalize or self.sc.l2_normalize)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"triplet": float(loss.detach()), "active": stats["fraction_active"]}

    def validate(self) -> dict[str, float]:
        dev = self.ctx.device
        e_train = batched(self.model, self.x_train, dev)  # (N, D)
        e_val = batched(self.model, self.x_val, dev)  # (M, D)
        if e_val.shape[0] == 0:
            return {"val_knn_acc": float("nan")}
        return {
            "val_knn_acc": knn_accuracy(e_train, self.y_train, e_val, self.y_val, k=self.sc.knn_k),
            # K = the classes the validation split holds, not the label space: THINGS-EEG2's labels include the
            # test concepts, and a leave-one-subject-out fold's validation may hold fewer trials than labels
            "val_kmeans_acc": clustering_accuracy(e_val, self.y_val, self.val_classes, seed=self.cfg.seed),
        }
