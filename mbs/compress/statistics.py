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
