"""SparseGPT (Frantar & Alistarh 2023): prune with the inverse Hessian of the layer inputs and update the remaining
weights of each row to compensate (OBS), column by column in lazy blocks; optionally quantize every kept weight in
the same pass (joint sparsification and quantization, as in the paper).

Mask selection (score w²/[H⁻¹]ᶜ_jj², the Cholesky diagonal, on the weights as updated so far):
- unstructured: per block of ``blocksize`` columns, when the block starts, exactly int(rows·block_columns·sparsity)
  weights of the block (over all its rows, as the reference does), so each block, and hence the matrix when
  rows·blocksize·sparsity is an integer, has the exact target sparsity;
- N:M: every m columns, when the sweep reaches them, the n lowest of each row (n zeros in every m).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mbs.compress.hessian import check_solver, prepare, sweep
from mbs.compress.masks import lowest_n_of_m, lowest_overall
from mbs.compress.pruning import Pruner
from mbs.compress.quantizer import ColumnQuantizer, QuantSpec
from mbs.compress.statistics import Hessian


@dataclass
class SparseGPT(Pruner):
    needs_statistics: ClassVar[bool] = True

    percdamp: float = 0.01
    blocksize: int = 128
    bits: int = 16  # 16: no quantization; 2-8: quantize the kept weights in the same pass
    sym: bool = False
    groupsize: int = -1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_solver(self.percdamp, self.blocksize)
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

    def new_statistic(self, module: nn.Linear) -> Hessian:
        return Hessian(module.in_features, module.weight.device)

    def compress(self, name: str, module: nn.Linear, statistic: Hessian) -> dict[str, Any]:
        prepared = prepare(statistic, module.weight, self.percdamp, name)
        weight, diag = prepared.weight, prepared.hinv.diagonal()
        mask = torch.zeros_like(weight, dtype=torch.bool)
        quantizer = ColumnQuantizer(self.spec, weight) if self.spec.enabled else None

        def block(start: int, end: int, w1: torch.Tensor, d1: torch.Tensor) -> None:
            if not self.structured and self.sparsity:
                mask[:, start:end] = lowest_overall(w1.square() / d1.square()[None, :], self.sparsity)

        def column(j: int, current: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
            if self.structured and j % self.m == 0:
                score = live[:, j : j + self.m].square() / diag[j : j + self.m].square()[None, :]
                mask[:, j : j + self.m] = lowest_n_of_m(score, self.n, self.m)
            out = current.masked_fill(mask[:, j], 0.0)
            return quantizer(j, out, live) if quantizer is not None else out

        lookahead = ((self.m,) if self.structured else ()) + (quantizer.lookahead if quantizer is not None else ())
        sweep(weight, prepared.hinv, self.blocksize, column, block, lookahead)
        module.weight.data.copy_(weight)
        figures: dict[str, Any] = {}
        if prepared.percdamp != self.percdamp:
            figures["percdamp"] = prepared.percdamp
        if quantizer is not None:
            self.records[name] = quantizer.record()
            figures.update(bits=self.bits, groupsize=self.groupsize)
        return figures
