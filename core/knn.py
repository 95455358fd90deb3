"""The kNN monitor: how well frozen features separate the classes, without training a head.

Self-supervised pretraining has no classifier to validate, so a monitored epoch scores its
backbone's features instead: each val image votes among its nearest train images. The vote is
class-balanced by default, since a plain vote on HAM10000 mostly says NV whatever the features.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score

_CHUNK = 1024  # queries per similarity block: 1024 x 10k floats is 40 MB


def _as_tensor(x, dtype: torch.dtype) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.detach().to(dtype)


@torch.no_grad()
def knn_balanced_accuracy(bank, bank_labels, query, query_labels, k: int = 20, temperature: float = 0.07,
                          balanced: bool = True, num_classes: int = 7) -> float:
    """Balanced accuracy of a cosine kNN classifier: frozen features scored without training a head.

    Each query takes the ``k`` most similar bank features (k is capped at the bank size) and
    weights their votes by exp(sim / temperature). With ``balanced`` each class's vote is divided
    by its frequency in the bank: on HAM10000 a plain vote mostly says NV, whatever the features.
    """
    b = _as_tensor(bank, torch.float32)
    q = _as_tensor(query, torch.float32).to(b.device)
    bl = _as_tensor(bank_labels, torch.int64).to(b.device)
    ql = _as_tensor(query_labels, torch.int64).cpu()
    if b.ndim != 2 or q.ndim != 2 or b.shape[1] != q.shape[1]:
        raise ValueError(f"bank and query must be 2-D features of one width, got {tuple(b.shape)} and {tuple(q.shape)}")
    if bl.shape != (b.shape[0],) or ql.shape != (q.shape[0],):
        raise ValueError(f"need one label per row: bank {tuple(b.shape)} vs labels {tuple(bl.shape)}, "
                         f"query {tuple(q.shape)} vs labels {tuple(ql.shape)}")
    if b.shape[0] == 0 or q.shape[0] == 0:
        raise ValueError("bank and query must each hold at least one feature")
    for name, lab in (("bank_labels", bl), ("query_labels", ql)):
        if lab.min() < 0 or lab.max() >= num_classes:
            raise ValueError(f"{name} must lie in 0..{num_classes - 1}; got {int(lab.min())}..{int(lab.max())}")
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")

    b = F.normalize(b, dim=1)
    k = min(k, b.shape[0])
    freq = torch.bincount(bl, minlength=num_classes).float() / bl.numel()
    preds = []
    for start in range(0, q.shape[0], _CHUNK):
        sim = F.normalize(q[start:start + _CHUNK], dim=1) @ b.T
        top_sim, top_idx = sim.topk(k, dim=1)
        # shifting by the best similarity rescales each query's votes alike and cannot overflow
        weights = torch.exp((top_sim - top_sim[:, :1]) / temperature)
        votes = torch.zeros(sim.shape[0], num_classes, device=b.device).scatter_add_(1, bl[top_idx], weights)
        if balanced:
            votes = votes / freq.clamp_min(1e-12)  # classes absent from the bank have no votes to scale
        preds.append(votes.argmax(dim=1).cpu())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(ql.numpy(), torch.cat(preds).numpy()))
