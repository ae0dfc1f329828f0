"""Mask selection shared by pruners: which weights to zero given a score (lower = less important).

Every selection equals a stable sort's (equal scores break by index, lowest first), so the same scores always give the
same mask; the k-th lowest score is found by selection (topk, kthvalue) rather than a full sort, which is faster.
"""
from __future__ import annotations

import torch


def lowest_per_row(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the int(in_features * sparsity) lowest-scored weights of every output row (exactly)."""
    k = int(score.shape[1] * sparsity)
    if not k:
        return torch.zeros_like(score, dtype=torch.bool)
    threshold = score.topk(k, dim=1, largest=False, sorted=False).values.amax(dim=1, keepdim=True)  # k-th lowest
    mask = score < threshold
    ties = score == threshold  # the k-th value may repeat: take the first ones of each row, as a stable sort does
    mask |= ties & (ties.cumsum(dim=1) <= k - mask.sum(dim=1, keepdim=True))
    return mask


def lowest_overall(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the int(numel * sparsity) lowest-scored weights of the whole matrix (exactly)."""
    return lowest_count(score, int(score.numel() * sparsity))


def lowest_count(score: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the k lowest-scored weights of the whole matrix (exactly)."""
    flat = score.flatten()
    if not k:
        return torch.zeros_like(score, dtype=torch.bool)
    threshold = flat.kthvalue(k).values
    mask = flat < threshold
    ties = (flat == threshold).nonzero().squeeze(1)  # ascending index: the ones a stable sort puts first
    mask[ties[: k - int(mask.sum())]] = True
    return mask.view_as(score)


def lowest_per_row_counts(score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Prune the ``counts[r]`` lowest-scored weights of each output row r (a stable sort's choice on ties)."""
    order = torch.sort(score, dim=1, stable=True).indices
    ranks = torch.arange(score.shape[1], device=score.device)[None, :]
    mask = torch.zeros_like(score, dtype=torch.bool)
    return mask.scatter_(1, order, ranks < counts.to(score.device)[:, None])


def row_counts(zeros: int, rows: int) -> torch.Tensor:
    """``zeros`` spread over ``rows`` as evenly as integers allow (the first rows take the remainder)."""
    counts = torch.full((rows,), zeros // rows, dtype=torch.long)
    counts[: zeros % rows] += 1
    return counts


def lowest_n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the n lowest-scored weights in every group of m consecutive input columns (N:M), vectorised."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.sort(groups, dim=2, stable=True).indices[..., :n], True)
    return mask.view(rows, cols)
