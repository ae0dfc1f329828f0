"""Mask selection shared by pruners: which weights to zero given a score (lower = less important).

All selections use a stable sort, so equal scores break by column index and the same scores always give the same mask.
"""
from __future__ import annotations

import torch


def lowest_per_row(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the int(in_features * sparsity) lowest-scored weights of every output row (exactly)."""
    k = int(score.shape[1] * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], True)
    return mask


def lowest_overall(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the int(numel * sparsity) lowest-scored weights of the whole matrix (exactly)."""
    k = int(score.numel() * sparsity)
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        mask[torch.sort(score.flatten(), stable=True).indices[:k]] = True
    return mask.view_as(score)


def lowest_n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the n lowest-scored weights in every group of m consecutive input columns (N:M), vectorised."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.sort(groups, dim=2, stable=True).indices[..., :n], True)
    return mask.view(rows, cols)
