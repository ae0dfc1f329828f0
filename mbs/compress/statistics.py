"""Statistics of Linear inputs that compressors share (kept fp32; addressable by language and layer in the engine)."""
from __future__ import annotations

from typing import TypeVar

import torch

S = TypeVar("S", bound="TokenSum")


class TokenSum:
    """An fp32 sum over tokens and the token count: merging statistics (of other languages) adds both, exactly."""

    def __init__(self, shape: tuple[int, ...], device: torch.device | str) -> None:
        self.sum = torch.zeros(shape, dtype=torch.float32, device=device)
        self.tokens = 0

    @classmethod
    def from_sum(cls: type[S], total: torch.Tensor, tokens: int) -> S:
        """The statistic of ``tokens`` tokens whose sum is ``total`` (computed elsewhere, e.g. kept on disk): merge it
        into a compressor's own statistic to hand that the sum."""
        statistic = cls.__new__(cls)
        statistic.sum = total.to(torch.float32)
        statistic.tokens = tokens
        return statistic

    def merge(self, other: "TokenSum") -> None:
        self.sum += other.sum.to(self.sum.device)
        self.tokens += other.tokens


class ColumnSquares(TokenSum):
    """Sum over tokens of each input feature's square: ||X_j||^2, what Wanda weighs |W| with."""

    def __init__(self, in_features: int, device: torch.device | str) -> None:
        super().__init__((in_features,), device)

    def update(self, x: torch.Tensor) -> None:
        self.sum += torch.linalg.vecdot(x, x, dim=0)  # Σ x² per column without a squared copy of x
        self.tokens += x.shape[0]

    @property
    def norm(self) -> torch.Tensor:
        return self.sum.sqrt()


class Hessian(TokenSum):
    """H = (2/n)·Σ xxᵀ over the n tokens seen, what SparseGPT and GPTQ solve against.

    The unscaled sum and the token count are kept apart, so merging statistics of different languages (different n)
    is exact: sums add, counts add, and the 2/n scale is applied once, at the end. H is symmetric, so only the blocks
    on and above the diagonal are accumulated (fewer products); ``matrix`` mirrors the upper triangle, so the matrix handed out is exactly symmetric.
    """

    BLOCK = 128  # rows of the upper-triangular band computed per product

    def __init__(self, in_features: int, device: torch.device | str) -> None:
        super().__init__((in_features, in_features), device)  # only the upper triangle of the sum is valid

    def update(self, x: torch.Tensor) -> None:
        width = self.sum.shape[0]
        for s in range(0, width, self.BLOCK):
            self.sum[s : s + self.BLOCK, s:].addmm_(x[:, s : s + self.BLOCK].T, x[:, s:])
        self.tokens += x.shape[0]

    @property
    def matrix(self) -> torch.Tensor:
        """A new tensor (callers may modify it; the statistic may be shared by several modules)."""
        if not self.tokens:
            raise ValueError("the Hessian has seen no tokens")
        upper = self.sum.triu()
        full = upper + upper.T  # exact: each off-diagonal entry is x + 0, the diagonal 2x, halved below
        full.diagonal().mul_(0.5)
        return full.mul_(2.0 / self.tokens)
