"""Collectives that keep "W workers x batch b" equal to "1 worker x batch W*b" under DDP.

DDP averages parameter gradients over ranks, which equals the single-worker gradient only when the
loss is a mean of per-sample terms over equal per-rank batches. Two things in the stages are not:

- mining a triplet over the batch (the encoder): ``gather`` hands every rank the global batch of
  embeddings, with gradients flowing back to the local rows;
- BatchNorm, whose statistics are a function of the whole batch: ``convert_sync_batchnorm`` swaps
  every BatchNorm for one whose statistics are reduced over all ranks. PyTorch's ``nn.SyncBatchNorm``
  runs on GPUs only, so CPU (gloo) runs get :class:`GlobalBatchNorm`, which works on any device.

Both gradients are exact under DDP's averaging. A collective's backward sums the gradient that every
rank's loss sends to a tensor: when every rank computes the same global loss ``L`` on the gathered
batch, rank r's local rows receive ``W * dL/de_r``, and DDP's division by W leaves ``dL/dtheta``; when
each rank computes its own loss ``L_r`` from global statistics, the sum gives the gradient of
``sum_r L_r`` and DDP's average that of ``mean_r L_r``, the single-worker loss for equal batches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; backward sums the incoming gradients over ranks (every rank's loss used the sum)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's rows (ranks may hold different numbers); backward: the summed gradient of
    this rank's rows. Gloo has no reduce-scatter, so the backward all-reduces the whole (N, ...) gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        world = dist.get_world_size()
        n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
        counts = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(counts, n)
        counts = [int(c.item()) for c in counts]
        most = max(counts)
        padded = x.new_zeros((most, *x.shape[1:]))  # (max n_r, ...): all_gather needs equal shapes
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        rank = dist.get_rank()
        ctx.start, ctx.stop = sum(counts[:rank]), sum(counts[: rank + 1])
        return torch.cat([p[:c] for p, c in zip(parts, counts)])  # (sum n_r, ...) in rank order

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start: ctx.stop]


def gather(x: Tensor) -> Tensor:
    """Rows of ``x`` (n_r, ...) from every rank, concatenated in rank order: (sum_r n_r, ...).

    Differentiable: the local rows receive the gradient summed over every rank's use of the result.
    Identity outside a process group (or with one rank). Every rank must call it, in the same order."""
    if _world() == 1:
        return x
    return _GatherRows.apply(x)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the batch of all ranks together, on any device (CPU / gloo included).

    Training mode: per-channel mean and biased variance over (N, *spatial) of every rank's batch, in two
    passes (the mean, then the mean squared deviation from it rather than E[x^2] - mean^2), each an
    autograd-aware all-reduce of per-channel sums (and the element count: ranks may hold different N);
    running statistics updated as ``F.batch_norm`` does (unbiased variance; ``momentum``, or a cumulative
    mean when it is None). Eval mode, or without a process group: plain ``F.batch_norm``. Input (N, C, *)
    with 2 or more dimensions; statistics in float32 at least (bfloat16 input under autocast), output in
    the input dtype. Same parameters, buffers and state-dict keys as ``nn.BatchNorm{1,2,3}d``.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training or _world() == 1:
            return super().forward(x)
        factor = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        C = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = (1, C, *([1] * (x.dim() - 2)))
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        count = xf.new_tensor([x.numel() // C])
        s = _AllReduceSum.apply(torch.cat([xf.sum(dims), count]))  # (C + 1,): global sums and element count
        n = s[C]
        mean = s[:C] / n  # (C,)
        centred = xf - mean.view(shape)
        var = _AllReduceSum.apply(centred.pow(2).sum(dims)) / n  # (C,) biased, as normalisation uses
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                unbiased = var.detach() * (n / (n - 1)) if n > 1 else var.detach()
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every ``nn.BatchNorm{1,2,3}d`` in ``module`` by a cross-rank one for a run on ``device``,
    keeping its parameters and buffers: ``nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` elsewhere.
    Returns the module (the root itself is replaced when it is a BatchNorm); call before moving it."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, (GlobalBatchNorm, nn.SyncBatchNorm)):
        like = next(iter(module.parameters()), None)
        like = like if like is not None else module.running_mean
        kw = {"device": like.device, "dtype": like.dtype} if like is not None else {}
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                              **kw)
        out.load_state_dict(module.state_dict())
        for p_new, p_old in zip(out.parameters(), module.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert(child))
    return out
