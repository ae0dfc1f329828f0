"""Pruners: magnitude (|W|, one threshold per matrix) and Wanda (|W|·||X||₂ compared per output row), both also
N:M; every pruner (SparseGPT too) takes a layer sparsity profile, ``layer_sparsity=uniform|owl`` (mbs/compress/profile.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mbs.compress.base import Compressor
from mbs.compress.masks import (lowest_count, lowest_n_of_m, lowest_overall, lowest_per_row, lowest_per_row_counts,
                                row_counts)
from mbs.compress.profile import PROFILES, outlier_ratio, owl_sparsities, zero_budgets
from mbs.compress.registry import register_compressor
from mbs.compress.statistics import ColumnSquares


@dataclass
class Pruner(Compressor):
    """Shared config of pruners: unstructured ``sparsity`` in [0, 1), or N:M (n zeros in every m columns, n/m = 0.5);
    ``layer_sparsity``: every layer at ``sparsity`` (uniform) or OWL's outlier-weighted profile with its M
    (``owl_m``) and λ (``owl_lambda``), published defaults 5 and 0.08 (arXiv 2310.05175; the reference's
    ``--Hyper_m 5 --Lamda 0.08``)."""

    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    layer_sparsity: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08

    def __post_init__(self) -> None:
        self.budgets: dict[str, int] = {}  # module full name -> zeros to prune, set by plan() (non-uniform profiles)
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"compressor.sparsity={self.sparsity} is outside [0, 1)")
        if self.n or self.m:
            if not (0 < self.n < self.m):
                raise ValueError(f"compressor N:M={self.n}:{self.m} needs 0 < N < M (e.g. 2:4 or 4:8)")
            if self.n * 2 != self.m:
                raise ValueError(f"compressor N:M={self.n}:{self.m} has ratio {self.n / self.m:g}; allowed: 0.5 (2:4, 4:8)")
            if self.sparsity != self.n / self.m:
                raise ValueError(f"compressor.sparsity={self.sparsity} contradicts N:M={self.n}:{self.m}; set it to 0.5")
        if self.layer_sparsity not in PROFILES:
            raise ValueError(f"compressor.layer_sparsity={self.layer_sparsity!r} is not a profile; allowed: "
                             f"{', '.join(PROFILES)}")
        if not self.owl_m > 0:
            raise ValueError(f"compressor.owl_m={self.owl_m} must be > 0 (OWL's M: a score above M times its layer's "
                             f"mean is an outlier; published default 5)")
        if not self.owl_lambda >= 0:
            raise ValueError(f"compressor.owl_lambda={self.owl_lambda} must be >= 0 (OWL's λ: layer sparsities stay "
                             f"within sparsity ± λ; published default 0.08)")
        if self.layer_sparsity != "uniform":
            if self.structured:
                raise ValueError(f"compressor.layer_sparsity={self.layer_sparsity} cannot apply to N:M="
                                 f"{self.n}:{self.m} (every layer keeps {self.m - self.n} of every {self.m}); use "
                                 f"compressor.layer_sparsity=uniform, or unstructured sparsity (compressor.n=0 "
                                 f"compressor.m=0)")
            if not 0 <= self.sparsity - self.owl_lambda or not self.sparsity + self.owl_lambda < 1:
                raise ValueError(f"compressor.owl_lambda={self.owl_lambda} with compressor.sparsity={self.sparsity} "
                                 f"would put layer sparsities outside [0, 1); allowed: λ <= sparsity and "
                                 f"sparsity + λ < 1")

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

    def select_count(self, score: torch.Tensor, zeros: int) -> torch.Tensor:
        """Exactly ``zeros`` of the lowest scores, spread over the rows as evenly as integers allow (a non-uniform
        profile's budget for this matrix)."""
        return lowest_per_row_counts(score, row_counts(zeros, score.shape[0]))

    def compress(self, name: str, module: nn.Linear, statistic: Any) -> dict[str, Any]:
        score = self.score(module, statistic)
        mask = self.select_count(score, self.budgets[name]) if name in self.budgets else self.select(score)
        module.weight.data[mask] = 0
        return {}

    @property
    def needs_profile(self) -> bool:
        return self.layer_sparsity != "uniform" and not self.is_noop

    def layer_figure(self, weights: dict[str, torch.Tensor], norms: dict[str, torch.Tensor]) -> float:
        """OWL's D_l of one dense layer: its Wanda scores |W_ij|·||X_j||₂ above owl_m times their mean."""
        scores = [w.detach().float().abs() * norms[name].to(w.device)[None, :] for name, w in weights.items()]
        return outlier_ratio(scores, self.owl_m)

    def plan(self, figures: list[float], modules: list[dict[str, int]]) -> dict[str, Any]:
        targets = owl_sparsities(figures, [sum(m.values()) for m in modules], self.sparsity, self.owl_lambda)
        self.budgets = zero_budgets(targets, modules, self.sparsity)
        return {"layer_sparsity": self.layer_sparsity, "owl_m": self.owl_m, "owl_lambda": self.owl_lambda,
                "outlier_ratios": figures, "target_sparsities": targets, "target_zeros": sum(self.budgets.values())}


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

    def select_count(self, score: torch.Tensor, zeros: int) -> torch.Tensor:
        return lowest_count(score, zeros)


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
