"""SparseGPT (Frantar & Alistarh 2023): prune with the inverse Hessian of the layer inputs and update the remaining
weights of each row to compensate (OBS), column by column in lazy blocks; optionally quantize every kept weight in
the same pass (joint sparsification and quantization, as in the paper).

Mask selection (score w²/[H⁻¹]ᶜ_jj², the Cholesky diagonal, on the weights as updated so far):
- unstructured: per block of ``blocksize`` columns, when the block starts, exactly k = int(rows·block_columns·sparsity)
  weights of the block, chosen over all its rows as in the reference; the reference zeroes every weight scoring
  <= the k-th sorted score (k+1, more on ties), this keeps exact k, so each block, and hence the matrix when
  rows·blocksize·sparsity is an integer, has the exact target sparsity; under a non-uniform layer profile the matrix's
  budget of zeros (mbs/compress/profile.py) is split over its blocks by their widths, each block pruning its share;
- N:M: every m columns, when the sweep reaches them, the n lowest of each row (n zeros in every m).

Joint quantization uses the GPTQ grid (mbs/compress/grid.py); the reference fits one grid per row only, groups
(``groupsize``) are fitted as the reference GPTQ fits them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mbs.compress.hessian import HessianSolver, factorize, sweep
from mbs.compress.masks import lowest_count, lowest_n_of_m, lowest_overall
from mbs.compress.profile import split
from mbs.compress.pruning import Pruner
from mbs.compress.grid import ColumnQuantizer, QuantSpec
from mbs.compress.registry import register_compressor
from mbs.compress.statistics import Hessian


@register_compressor("sparsegpt")
@dataclass
class SparseGPT(HessianSolver, Pruner):
    bits: int = 16  # 16: no quantization; 2-8: quantize the kept weights in the same pass
    sym: bool = False
    groupsize: int = -1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.spec.validate(allow_off=True)
        if self.structured and self.blocksize % self.m:
            raise ValueError(f"compressor.blocksize={self.blocksize} must be a multiple of M={self.m} for N:M")
        self.records: dict[str, dict[str, Any]] = {}  # module name -> quantization grid (joint mode), for export

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.sym, self.groupsize)

    @property
    def is_noop(self) -> bool:
        return self.sparsity == 0.0 and not self.spec.enabled

    def check(self, name: str, module: nn.Linear) -> None:
        super().check(name, module)
        self.spec.check_width(name, module.in_features)

    def compress(self, name: str, module: nn.Linear, statistic: Hessian) -> dict[str, Any]:
        prepared = factorize(statistic, module.weight, self.percdamp, name)
        weight, diag = prepared.weight, prepared.hinv.diagonal()
        pruned = torch.zeros(weight.shape[1], weight.shape[0], dtype=torch.bool, device=weight.device)  # [col, row]
        quantizer = ColumnQuantizer(self.spec.for_weight(module.weight), weight, self.blocksize) if self.spec.enabled else None

        cols = weight.shape[1]
        budget = None  # a non-uniform profile's zeros for this matrix, split over the blocks by their widths
        if name in self.budgets:
            widths = [min(self.blocksize, cols - s) for s in range(0, cols, self.blocksize)]
            budget = split(self.budgets[name], widths)

        def block(start: int, end: int, w1: torch.Tensor, d1: torch.Tensor) -> None:
            if budget is not None:
                pruned[start:end] = lowest_count(w1.square() / d1.square()[None, :], budget[start // self.blocksize]).T
            elif not self.structured and self.sparsity:
                pruned[start:end] = lowest_overall(w1.square() / d1.square()[None, :], self.sparsity).T

        def column(j: int, current: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
            if self.structured and j % self.m == 0:
                score = live[:, j : j + self.m].square() / diag[j : j + self.m].square()[None, :]
                pruned[j : j + self.m] = lowest_n_of_m(score, self.n, self.m).T
            out = current.masked_fill(pruned[j], 0.0)  # contiguous, like the sweep's columns
            return quantizer(j, out, live) if quantizer is not None else out

        sweep(weight, prepared.hinv, self.blocksize, column, block, (self.m,) if self.structured else ())
        module.weight.data.copy_(weight)
        figures = self.damping_figures(prepared)
        if quantizer is not None:
            self.records[name] = quantizer.record()
            figures.update(bits=self.bits, groupsize=self.groupsize)
        return figures
