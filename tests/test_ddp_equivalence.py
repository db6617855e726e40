"""DDP is exact for every trained stage: 2 workers x batch b give the gradients and the parameters (and the
BatchNorm running statistics) of 1 worker x batch 2b after one optimiser step.

All three stages have BatchNorm (the tsconv encoders, the GAN's generator), which only matches with
cross-rank statistics; the encoder's triplets are mined over the gathered global P x K batch. The two
workers are gloo processes started with torch.multiprocessing (no Ray); the one-worker reference runs in
this process. Tolerance: float32 round-off, ``rtol=1e-4`` with ``atol`` 1e-5 of the module's largest value.

The step is plain SGD in place of each stage's Adam: Adam's first step is ``lr * g / (|g| + eps)``, about
``lr * sign(g)``, blind to a wrong gradient scale and unstable where a gradient is round-off (a conv bias in
front of BatchNorm has a zero true gradient); SGD's step is the gradient itself.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from neuroimagen.config import load_config
from neuroimagen.stages import build_stage
from neuroimagen.stages.encoder import build_from_spec, encoder_spec
from neuroimagen.training.collectives import GlobalBatchNorm, convert_sync_batchnorm, gather
from neuroimagen.training.context import RunContext, seed_everything, unwrap

STAGES = ("encoder", "saliency", "semantic", "clip_image")
LR = 0.5


def _sets(twin, world: int) -> list[str]:
    b = 6  # per-worker batch of the GAN and the regressor; the encoder's is 3 classes x 3 trials
    per = b * (2 // world)
    return [f"data.eeg={twin / 'eeg_5_95_std.pth'}", f"data.splits={twin / 'block_splits_by_image_all.pth'}",
            f"data.images={twin / 'images'}", "data.image_size=32", "train.backend=local", "train.progress=false",
            "stages.encoder.name=tsconv", "stages.encoder.width=8", "stages.encoder.embed_dim=8",
            "stages.encoder.dropout=0.0", "stages.encoder.mining=batch_all", "stages.encoder.margin=1.0",
            f"stages.encoder.classes_per_batch={3 * (2 // world)}", "stages.encoder.samples_per_class=3",
            "stages.saliency.resolution=32", "stages.saliency.g_width=8", "stages.saliency.d_width=8",
            "stages.saliency.z_dim=8", f"stages.saliency.batch_size={per}", "stages.saliency.diffaugment=''",
            # mode seeking is a ratio of batch means, not a mean of per-sample terms: no per-rank loss
            # averages to it, so it is off here (the adversarial and SSIM terms are on)
            "stages.saliency.alpha1=0.0",
            "stages.semantic.encoder=tsconv", "stages.semantic.width=8", "stages.semantic.embed_dim=8",
            "stages.semantic.hidden=16", "stages.semantic.dropout=0.0", "stages.semantic.init_from_encoder=false",
            f"stages.semantic.batch_size={per}",
            # clip_image: the InfoNCE over the gathered global batch of distinct images, learnable temperature
            "stages.clip_image.encoder=tsconv", "stages.clip_image.width=8", "stages.clip_image.embed_dim=8",
            "stages.clip_image.dropout=0.0", "stages.clip_image.init_from_encoder=false",
            f"stages.clip_image.batch_size={per}"]


def _rank_independent_z(rank: int, world: int):
    """The GAN's noise as the rows of one global draw per call (the stage draws z per rank from its own RNG)."""
    import neuroimagen.stages.saliency as saliency

    draw, calls = saliency.sample_z, [0]

    def sample_z(batch, z_dim, generator=None, device=None):
        if generator is not None:  # the fixed validation noise
            return draw(batch, z_dim, generator=generator, device=device)
        calls[0] += 1
        z = draw(batch * world, z_dim, generator=torch.Generator().manual_seed(100 + calls[0]))  # (W*B, Z)
        return z[rank * batch: (rank + 1) * batch].to(device)

    saliency.sample_z = sample_z
    return draw


def _one_step(rank: int, world: int, sets: list[str], inputs: dict) -> dict:
    """Build each stage, take its first batch, one SGD step; the modules' states and gradients."""
    cfg = load_config(None, sets)
    ctx = RunContext(rank=rank, world_size=world)
    out = {}
    for name in STAGES:
        stage = build_stage(name, cfg, ctx, dict(inputs[name]))
        opts = stage.optimizers()
        for k, opt in opts.items():
            opts[k] = torch.optim.SGD([p for g in opt.param_groups for p in g["params"]], lr=LR)
        seed_everything(cfg.seed, 0, 0)
        stage.set_epoch(0)
        batch = next(iter(stage.loader))
        stage.train_step(batch)
        out[name] = {
            "rows": int(next(iter(batch.values())).shape[0]),
            "state": {m: {k: v.detach().clone() for k, v in unwrap(mod).state_dict().items()}
                      for m, mod in stage.modules().items()},
            "grad": {m: {k: p.grad.detach().clone() for k, p in unwrap(mod).named_parameters() if p.grad is not None}
                     for m, mod in stage.modules().items()},
        }
    return out


def _unequal_rows(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0 holds 1 row, rank 1 holds 2 (a P x K batch with a short class shards unevenly): the global
    (3, 2, 2, 2) input of a BatchNorm and (3,) loss weights."""
    x = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 3 + 1
    w = torch.arange(1.0, 4.0, dtype=torch.float64)
    return (x[:1], w[:1]) if rank == 0 else (x[1:], w[1:])


def _collectives(rank: int) -> dict:
    """``gather`` and ``GlobalBatchNorm`` on unequal shards: values and the gradients of the local rows."""
    x, w = _unequal_rows(rank)
    x = x.clone().requires_grad_(True)
    rows = gather(x)  # (3, 2, 2, 2) on every rank
    (rows.sum(dim=(1, 2, 3)) * gather(w)).sum().backward()  # the same global loss on every rank
    out = {"gathered": rows.detach(), "gather_grad": x.grad.clone()}
    bn = convert_sync_batchnorm(nn.BatchNorm2d(2).double(), torch.device("cpu"))
    x2 = x.detach().clone().requires_grad_(True)
    y = bn(x2)
    (y * y.detach().roll(1, dims=1)).sum().backward()  # a per-rank loss whose mean over ranks is the global one
    out.update(bn_out=y.detach(), bn_grad=x2.grad.clone(), bn_state=bn.state_dict(), bn_weight_grad=bn.weight.grad.clone())
    return out


def _worker(rank: int, world: int, port: int, sets: list[str], inputs: dict, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = {"collectives": _collectives(rank)}
        _rank_independent_z(rank, world)
        out.update(_one_step(rank, world, sets, inputs))
        torch.save(out, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def steps(twin, tmp_path_factory):
    """{1: one worker's step, 2: [rank 0's, rank 1's] step}, stage by stage."""
    import neuroimagen.stages.saliency as saliency
    from neuroimagen.data.datasets import load_splits

    run = tmp_path_factory.mktemp("ddp")
    cfg1 = load_config(None, _sets(twin, 1))
    splits = load_splits(cfg1.data, image_mode="none")
    C, T = splits["train"].eeg_tensor().shape[1:]
    spec = encoder_spec(cfg1.stages.encoder, C, T)
    torch.manual_seed(0)
    enc_state = build_from_spec(spec).state_dict()
    # stand-in caption embeddings (K classes x 4 tokens x 8): a text encoder is not what is tested here
    K = splits["train"].num_classes
    table = torch.randn(K, 4, 8, generator=torch.Generator().manual_seed(1))
    targets = {"table": table, "index": {s: splits[s].labels.long() for s in ("train", "val")}, "prototypes": table,
               "kind": "label", "identity": "random", "fingerprint": "random", "cache": ""}
    # stand-in CLIP image embeddings (one row per image, 8 wide): a vision model is not what is tested here
    stems = sorted({s for sp in ("train", "val") for s in splits[sp].stems})
    pos = {s: i for i, s in enumerate(stems)}
    clip_targets = {"table": torch.randn(len(stems), 8, generator=torch.Generator().manual_seed(2)),
                    "index": {sp: torch.tensor([pos[s] for s in splits[sp].stems]) for sp in ("train", "val")},
                    "mean": torch.zeros(8), "identity": "random", "fingerprint": "random", "cache": ""}
    inputs = {"encoder": {}, "saliency": {"encoder_spec": spec, "encoder_state": enc_state},
              "semantic": {"targets": targets}, "clip_image": {"clip_targets": clip_targets}}

    draw = _rank_independent_z(0, 1)
    try:
        one = _one_step(0, 1, _sets(twin, 1), inputs)
    finally:
        saliency.sample_z = draw
    path = str(run / "step")
    # fork: the workers inherit the loaded modules instead of importing them again (seconds each on 2 cores)
    mp.start_processes(_worker, args=(2, _free_port(), _sets(twin, 2), inputs, path), nprocs=2, join=True,
                       start_method="fork")
    two = [torch.load(f"{path}.{r}", weights_only=True) for r in range(2)]
    return {1: one, 2: two}


def _assert_close(a: dict, b: dict, what: str) -> None:
    """Every tensor equal up to float32 round-off: rtol 1e-4, atol 1e-5 of the largest value in ``a`` (a
    gradient that is zero but for round-off, such as a conv bias before BatchNorm, is noise at that scale)."""
    assert set(a) == set(b), what
    scale = max(float(v.abs().max()) for v in a.values() if v.is_floating_point() and v.numel()) or 1.0
    for k, v in a.items():
        w = b[k]
        if not v.is_floating_point():
            assert torch.equal(v, w), f"{what} {k}"
            continue
        assert torch.allclose(v, w, rtol=1e-4, atol=1e-5 * scale), \
            f"{what} {k}: max |diff| {float((v - w).abs().max()):.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("stage", STAGES)
def test_two_workers_equal_one_worker_with_the_double_batch(steps, stage):
    one, (r0, r1) = steps[1][stage], [s[stage] for s in steps[2]]
    assert r0["rows"] + r1["rows"] == one["rows"] and r0["rows"] > 0 and r1["rows"] > 0
    for module in one["state"]:
        _assert_close(one["grad"][module], r0["grad"][module], f"{stage}/{module} gradient")
        _assert_close(one["state"][module], r0["state"][module], f"{stage}/{module} after one step")
        _assert_close(r0["state"][module], r1["state"][module], f"{stage}/{module} rank 1 vs rank 0")
        # the step did something, far beyond the tolerance: it moved weights and BatchNorm statistics
        grads = one["grad"][module]
        assert grads and max(float(g.abs().max()) for g in grads.values()) > 1e-3, module
    running = [k for m in one["state"].values() for k in m if k.endswith("running_mean")]
    assert running, f"{stage}: no BatchNorm in the stage's modules; the test would not check their statistics"


def test_gather_and_global_batchnorm_on_unequal_shards(steps):
    """Against one process holding all 3 rows: ``gather`` returns them in rank order and gives each rank the
    gradient of its rows (W x that of the global loss, which DDP's average divides back); ``GlobalBatchNorm``
    normalises with the 3-row statistics, updates the same running statistics, and its input and weight
    gradients (weight: after DDP's average) are those of ``nn.BatchNorm2d`` on the whole batch."""
    r0, r1 = (s["collectives"] for s in steps[2])
    x = torch.cat([_unequal_rows(r)[0] for r in range(2)]).requires_grad_(True)  # (3, 2, 2, 2)
    w = torch.cat([_unequal_rows(r)[1] for r in range(2)])
    assert torch.equal(r0["gathered"], x.detach()) and torch.equal(r1["gathered"], x.detach())
    assert torch.equal(torch.cat([r0["gather_grad"], r1["gather_grad"]]), 2 * w.view(3, 1, 1, 1).expand_as(x))

    bn = nn.BatchNorm2d(2).double()
    y = bn(x)
    # the per-rank losses summed: DDP averages parameter gradients, so the reference loss is their mean
    ((y * y.detach().roll(1, dims=1))[:1].sum() + (y * y.detach().roll(1, dims=1))[1:].sum()).div(2).backward()
    assert isinstance(convert_sync_batchnorm(nn.BatchNorm2d(2), torch.device("cpu")), GlobalBatchNorm)
    assert torch.allclose(torch.cat([r0["bn_out"], r1["bn_out"]]), y.detach(), atol=1e-12)
    assert torch.allclose(torch.cat([r0["bn_grad"], r1["bn_grad"]]), 2 * x.grad, atol=1e-12)
    assert torch.allclose((r0["bn_weight_grad"] + r1["bn_weight_grad"]) / 2, bn.weight.grad, atol=1e-12)
    for k, v in bn.state_dict().items():
        assert torch.allclose(r0["bn_state"][k].to(v.dtype), v, atol=1e-12) and torch.equal(r0["bn_state"][k], r1["bn_state"][k]), k
