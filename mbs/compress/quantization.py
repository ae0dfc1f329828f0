"""Weight quantizers on the shared grid (mbs/compress/grid.py): RTN (round to nearest, data-free) and GPTQ
(Frantar et al. 2023: quantize column by column and push each column's rounding error onto the columns not yet
quantized through the inverse Hessian of the inputs). Weights stay in the model's dtype, fake-quantized; each module's
scales, zero points and column->group map are kept in ``records`` for export."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mbs.compress.base import Compressor
from mbs.compress.hessian import HessianSolver, factorize, sweep
from mbs.compress.grid import ColumnQuantizer, QuantSpec, record
from mbs.compress.registry import register_compressor
from mbs.compress.statistics import Hessian


@dataclass
class Quantizing(Compressor):
    """Shared config of weight quantizers: ``bits`` (2-8), symmetric or not, ``groupsize`` (-1: per channel)."""

    bits: int = 4
    sym: bool = False
    groupsize: int = -1

    def __post_init__(self) -> None:
        self.spec.validate()
        self.records: dict[str, dict[str, Any]] = {}  # module name -> its grids, for export

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.sym, self.groupsize)

    def check(self, name: str, module: nn.Linear) -> None:
        self.spec.check_width(name, module.in_features)

    def _figures(self, name: str, grids: dict[str, Any]) -> dict[str, Any]:
        self.records[name] = grids
        return {"bits": self.bits, "groupsize": self.groupsize, "sym": self.sym}


@register_compressor("rtn")
@dataclass
class RTN(Quantizing):
    """Round every weight to the nearest level of its group's min-max grid; no calibration."""

    needs_statistics: ClassVar[bool] = False

    def compress(self, name: str, module: nn.Linear, statistic: Any) -> dict[str, Any]:
        spec = self.spec.for_weight(module.weight)
        w = module.weight.detach()
        w = w.to(torch.promote_types(w.dtype, torch.float32))  # fp32 arithmetic (fp64 weights keep theirs)
        scale, zero = spec.fit_groups(w)
        module.weight.data.copy_(spec.quantize_groups(w, scale, zero))
        g_idx = torch.arange(w.shape[1], device=w.device) // spec.group_width(w.shape[1])
        return self._figures(name, record(spec, scale, zero, g_idx))


@register_compressor("gptq")
@dataclass
class GPTQ(HessianSolver, Quantizing):
    """GPTQ with the defaults of ``compressor=gptq`` (conf/compressor/gptq.yaml, picked on measured quality): 4-bit
    asymmetric, groups of 128, act-order, static groups. The paper's plain column order with groups fitted during the
    sweep is ``GPTQ(actorder=False, static_groups=False)``; one grid per row is ``groupsize=-1``."""

    groupsize: int = 128  # what serving kernels expect; a divisor of every layer's input width, or -1
    actorder: bool = True  # process columns by decreasing diag H (most active inputs first)
    static_groups: bool = True  # fit group grids before the sweep on unpermuted columns (act-order keeps groups)

    def compress(self, name: str, module: nn.Linear, statistic: Hessian) -> dict[str, Any]:
        prepared = factorize(statistic, module.weight, self.percdamp, name, actorder=self.actorder)
        quantizer = ColumnQuantizer(self.spec.for_weight(module.weight), prepared.weight, self.blocksize, prepared.perm,
                                    self.static_groups)
        weight = sweep(prepared.weight, prepared.hinv, self.blocksize, quantizer)
        if prepared.perm is not None:
            weight = weight[:, torch.argsort(prepared.perm)]
        module.weight.data.copy_(weight)
        return {**self._figures(name, quantizer.record()), **self.damping_figures(prepared)}
