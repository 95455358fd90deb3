"""The pretraining losses: NT-Xent (SimCLR; in one process or over the global batch of
several), InfoNCE against a queue (MoCo v2), and BYOL's normalised regression loss.

All three compute in at least float32, also under autocast: bf16 has too few bits for logits
of size 1/T and for 2 - 2cos near 0.

Gradient convention across processes: every rank computes the loss of the whole global batch
(the same value everywhere), and `gather_with_grad` sums the gradients that all ranks send
back to each slice. Rank r's local embeddings therefore receive world_size x dL/dz_r, and
DistributedDataParallel, which averages parameter gradients over ranks, ends with exactly
dL/dtheta: DDP training takes the same steps as one process on the concatenated batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """Mean over the 2N views of -log softmax(sim / T) at the view's twin, self-similarity excluded.

    Row i of z1 and row i of z2 are two views of one image; the other 2N - 2 views are its
    negatives. Computed in at least float32, also under autocast: bf16 has too few bits for
    logits of size 1/T, and cross_entropy's logsumexp keeps small temperatures from overflowing."""
    if z1.ndim != 2 or z1.shape != z2.shape or len(z1) == 0:
        raise ValueError(f"nt_xent takes two (N, D) embeddings of the same shape with N >= 1; "
                         f"got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"nt_xent temperature must be > 0, got {temperature}")
    n = len(z1)
    with torch.autocast(z1.device.type, enabled=False):
        z = torch.cat([z1, z2])
        z = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)
        logits = z @ z.T / temperature
        self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        twins = torch.arange(2 * n, device=z.device).roll(n)  # view i's twin is i + n (mod 2N)
        return F.cross_entropy(logits, twins)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from all ranks in rank order; gradients flow back to each rank's own slice.

    Every rank must pass the same shape (DistributedSampler gives each rank equally many
    samples; SimCLR loaders drop the last incomplete batch). Identity in a single process."""
    return _GatherWithGrad.apply(x) if _distributed() else x


def nt_xent_gathered(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent over the global batch: more negatives per view, and the same value on every rank.

    Each rank builds the full (2N_global)^2 similarity matrix: redundant work, but small next to
    the backbone, and it keeps the loss identical to the single-process one."""
    return nt_xent(gather_with_grad(z1), gather_with_grad(z2), temperature)


class NTXentLoss(nn.Module):
    def __init__(self, temperature: float, gather: bool = False):
        super().__init__()
        self.temperature = temperature
        self.gather = gather

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return (nt_xent_gathered if self.gather else nt_xent)(z1, z2, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather={self.gather}"


def _check_pair(name: str, a: Tensor, b: Tensor) -> None:
    if a.ndim != 2 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"{name} takes two (N, D) embeddings of the same shape with N >= 1; "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


def _float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo's InfoNCE: mean over queries of -log softmax(sim / T) at the query's own key.

    Row i of `k` is another view of query i's image (from the momentum encoder); the rows of
    `queue` are keys of earlier batches, the negatives. All three are compared as unit vectors."""
    _check_pair("info_nce", q, k)
    if queue.ndim != 2 or queue.shape[1] != q.shape[1] or len(queue) == 0:
        raise ValueError(f"info_nce takes a (K, D) queue with K >= 1 and D = {q.shape[1]}; got {tuple(queue.shape)}")
    if temperature <= 0:
        raise ValueError(f"info_nce temperature must be > 0, got {temperature}")
    with torch.autocast(q.device.type, enabled=False):
        q, k = F.normalize(_float32(q), dim=1), F.normalize(_float32(k), dim=1)
        negatives = F.normalize(queue.to(q.dtype), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.T], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's loss for one direction: |p/|p| - z/|z||^2 = 2 - 2 cos(p, z), averaged over the batch.

    `p` is the online network's prediction of one view, `z` the target network's projection of
    the other; the method passes `z` without gradient (the target moves only by its EMA)."""
    _check_pair("byol_loss", p, z)
    with torch.autocast(p.device.type, enabled=False):
        return (2 - 2 * F.cosine_similarity(_float32(p), _float32(z), dim=1)).mean()
