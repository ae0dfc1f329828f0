"""Pruners: magnitude (|W|, one threshold per matrix) and Wanda (|W|·||X||₂ compared per output row), both also N:M."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mbs.compress.base import Compressor
from mbs.compress.masks import lowest_n_of_m, lowest_overall, lowest_per_row
from mbs.compress.registry import register_compressor
from mbs.compress.statistics import ColumnSquares


@dataclass
class Pruner(Compressor):
    """Shared config of pruners: unstructured ``sparsity`` in [0, 1), or N:M (n zeros in every m columns, n/m = 0.5)."""

    sparsity: float = 0.5
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"compressor.sparsity={self.sparsity} is outside [0, 1)")
        if self.n or self.m:
            if not (0 < self.n < self.m):
                raise ValueError(f"compressor N:M={self.n}:{self.m} needs 0 < N < M (e.g. 2:4 or 4:8)")
            if self.n * 2 != self.m:
                raise ValueError(f"compressor N:M={self.n}:{self.m} has ratio {self.n / self.m:g}; allowed: 0.5 (2:4, 4:8)")
            if self.sparsity != self.n / self.m:
                raise ValueError(f"compressor.sparsity={self.sparsity} contradicts N:M={self.n}:{self.m}; set it to 0.5")

    @property
    def structured(self) -> bool:
        return bool(self.m)

    @property
    def is_noop(self) -> bool:
        return self.sparsity == 0.0

    def check(self, name: str, module: nn.Linear) -> None:
        if self.structured and module.in_features % self.m:
            raise ValueError(f"{name}: in_features={module.in_features} is not divisible by M={self.m} for N:M pruning")

    def score(self, module: nn.Linear, statistic: Any) -> torch.Tensor:
        raise NotImplementedError

    def select(self, score: torch.Tensor) -> torch.Tensor:
        if self.structured:
            return lowest_n_of_m(score, self.n, self.m)
        return lowest_per_row(score, self.sparsity)

    def compress(self, name: str, module: nn.Linear, statistic: Any) -> dict[str, Any]:
        mask = self.select(self.score(module, statistic))
        module.weight.data[mask] = 0
        return {}


@register_compressor("magnitude")
@dataclass
class Magnitude(Pruner):
    """Exactly k = int(numel·sparsity) lowest |W| per matrix; the reference (Wanda's ``prune_magnitude``) zeroes every
    weight <= the k-th sorted score, k+1 or more on ties."""

    needs_statistics: ClassVar[bool] = False

    def score(self, module: nn.Linear, statistic: Any) -> torch.Tensor:
        return module.weight.detach().float().abs()

    def select(self, score: torch.Tensor) -> torch.Tensor:
        return lowest_n_of_m(score, self.n, self.m) if self.structured else lowest_overall(score, self.sparsity)


@register_compressor("wanda")
@dataclass
class Wanda(Pruner):
    needs_statistics: ClassVar[bool] = True

    def new_statistic(self, module: nn.Linear) -> ColumnSquares:
        return ColumnSquares(module.in_features, module.weight.device)

    def score(self, module: nn.Linear, statistic: ColumnSquares) -> torch.Tensor:
        return module.weight.detach().float().abs() * statistic.norm.to(module.weight.device)[None, :]


@register_compressor("dense")
@dataclass
class Dense(Compressor):
    """The no-op compressor: the dense baseline through the same pipeline."""

    @property
    def is_noop(self) -> bool:
        return True

    def compress(self, name: str, module: nn.Linear, statistic: Any) -> dict[str, Any]:
        return {}
