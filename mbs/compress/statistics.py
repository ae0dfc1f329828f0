"""Statistics of Linear inputs that compressors share (kept fp32; addressable by language and layer in the engine)."""
from __future__ import annotations

import torch


class ColumnSquares:
    """Sum over tokens of each input feature's square: ||X_j||^2, what Wanda weighs |W| with."""

    def __init__(self, in_features: int, device: torch.device | str) -> None:
        self.sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        self.sum += x.square().sum(dim=0)
        self.tokens += x.shape[0]

    def merge(self, other: "ColumnSquares") -> None:
        self.sum += other.sum.to(self.sum.device)
        self.tokens += other.tokens

    @property
    def norm(self) -> torch.Tensor:
        return self.sum.sqrt()


class Hessian:
    """H = (2/n)·Σ xxᵀ over the n tokens seen, what SparseGPT and GPTQ solve against.

    The unscaled sum and the token count are kept apart, so merging statistics of different languages (different n)
    is exact: sums add, counts add, and the 2/n scale is applied once, at the end.
    """

    def __init__(self, in_features: int, device: torch.device | str) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def merge(self, other: "Hessian") -> None:
        self.sum += other.sum.to(self.sum.device)
        self.tokens += other.tokens

    @property
    def matrix(self) -> torch.Tensor:
        """A new tensor (callers may modify it; the statistic may be shared by several modules)."""
        if not self.tokens:
            raise ValueError("the Hessian has seen no tokens")
        return self.sum * (2.0 / self.tokens)
