"""The one quantization grid shared by RTN, GPTQ and joint SparseGPT: per output row (and per group of input
columns), min-max with zero inside the range, asymmetric or symmetric, 2-8 bits; weights are fake-quantized (kept in
the model's dtype, on the grid), and every group's scale and zero point are kept so the result can be exported.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    sym: bool = False
    groupsize: int = -1  # -1: one grid per output row; else columns per group (must divide in_features)
    # Scales are rounded to this dtype (the weight's own, as a checkpoint stores them: compressed-tensors keeps
    # scales in the model dtype), so the fake-quantized weights are exactly what a reloaded checkpoint decompresses.
    scale_dtype: torch.dtype | None = None
    # False: the group's own min and max (AWQ's grid, mbs/compress/awq.py): 0 need not be a level (asymmetric only)
    zero_in_range: bool = True

    def for_weight(self, weight: torch.Tensor) -> "QuantSpec":
        """This grid with scales stored in ``weight``'s dtype."""
        return replace(self, scale_dtype=weight.dtype)

    def validate(self, allow_off: bool = False) -> None:
        """Raise on a bad config value (called from compressors' __post_init__, before the model loads)."""
        if not (2 <= self.bits <= 8 or (allow_off and self.bits == 16)):
            allowed = "2-8, or 16 (no quantization)" if allow_off else "2-8"
            raise ValueError(f"compressor.bits={self.bits} is not allowed; allowed: {allowed}")
        if self.groupsize != -1 and self.groupsize < 1:
            raise ValueError(f"compressor.groupsize={self.groupsize} must be -1 (per channel) or >= 1")

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def check_width(self, name: str, in_features: int) -> None:
        if self.enabled and self.groupsize > 0 and in_features % self.groupsize:
            raise ValueError(f"{name}: compressor.groupsize={self.groupsize} does not divide in_features={in_features}")

    def group_width(self, in_features: int) -> int:
        return self.groupsize if self.groupsize > 0 else in_features

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of the grid over the last dimension of ``w`` (fp32), kept with a trailing dim of 1."""
        if not self.zero_in_range and not self.sym:  # llm-awq pseudo_quantize_tensor's grid
            xmin, xmax = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
            scale = (xmax - xmin).clamp(min=1e-5) / self.maxq
            if self.scale_dtype is not None and self.scale_dtype != scale.dtype:
                scale = scale.to(self.scale_dtype).to(w.dtype).clamp_min(torch.finfo(self.scale_dtype).tiny)
            return scale, torch.round(-xmin / scale).clamp(0, self.maxq)
        zero_ = torch.zeros((), dtype=w.dtype, device=w.device)
        xmin = torch.minimum(w.amin(dim=-1, keepdim=True), zero_)
        xmax = torch.maximum(w.amax(dim=-1, keepdim=True), zero_)
        if self.sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        empty = (xmin == 0) & (xmax == 0)  # an all-zero row or group: any grid holds it exactly
        xmin = torch.where(empty, -1.0, xmin)
        xmax = torch.where(empty, 1.0, xmax)
        scale = (xmax - xmin) / self.maxq
        if self.scale_dtype is not None and self.scale_dtype != scale.dtype:
            scale = scale.to(self.scale_dtype).float().clamp_min(torch.finfo(self.scale_dtype).tiny)
        if self.sym:
            zero = torch.full_like(scale, (self.maxq + 1) / 2)
        else:  # clamped: a scale rounded down can put -xmin/scale a hair above maxq
            zero = torch.round(-xmin / scale).clamp(0, self.maxq)
        return scale, zero

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Round to the grid: at most 2^bits values, and 0 is always one of them (pruned weights stay 0)."""
        q = torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)
        return scale * (q - zero)

    def fit_groups(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grids of every group of consecutive columns of ``w`` [rows, cols]: scale and zero [rows, groups]."""
        rows, cols = w.shape
        scale, zero = self.fit(w.reshape(rows, cols // self.group_width(cols), -1))
        return scale[..., 0], zero[..., 0]

    def quantize_groups(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        rows, cols = w.shape
        grouped = w.reshape(rows, scale.shape[1], -1)
        return self.quantize(grouped, scale[..., None], zero[..., None]).reshape(rows, cols)


def record(spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor) -> dict[str, Any]:
    """What an exporter needs of one module: scale/zero [rows, groups] (fp32), g_idx[column] = its group."""
    return {"bits": spec.bits, "sym": spec.sym, "groupsize": spec.groupsize, "scale": scale.float().cpu(),
            "zero": zero.float().cpu(), "g_idx": g_idx.to(torch.int32).cpu()}


class ColumnQuantizer:
    """Quantizes the columns of a weight one at a time, in processing order (possibly permuted: act-order), for the
    sequential solvers. Per channel and with static groups, grids are fitted once up front on the unpermuted weights
    (with act-order the grouping stays the unpermuted one: what a plain g_idx-free export needs). Otherwise each group
    is fitted as the reference GPTQ (IST-DASLab ``fasterquant``) fits it: on the weights as they stood when the sweep's
    block holding the group's first column started, i.e. with the updates of earlier blocks but none of the current
    block's (the reference reads ``W``, which the lazy update only changes at block ends, not the in-block ``W1``).
    All groups whose first column falls in a block are therefore fitted when that block's first column comes."""

    def __init__(self, spec: QuantSpec, weight: torch.Tensor, blocksize: int, perm: torch.Tensor | None = None,
                 static_groups: bool = False) -> None:
        rows, cols = weight.shape
        self.spec, self.perm, self.width, self.blocksize = spec, perm, spec.group_width(cols), blocksize
        self.static = static_groups or spec.groupsize <= 0
        if self.static:
            original = weight if perm is None else weight[:, torch.argsort(perm)]
            self.scale, self.zero = spec.fit_groups(original)
            self.g_idx = torch.arange(cols, device=weight.device) // self.width
            position_group = self.g_idx if perm is None else self.g_idx[perm]
            self.position_group = position_group.tolist()  # processing position -> group (a list: read per column)
        else:
            self.scales: list[torch.Tensor] = []
            self.zeros: list[torch.Tensor] = []
            position_group = torch.arange(cols, device=weight.device) // self.width
            self.g_idx = position_group if perm is None else position_group[torch.argsort(perm)]

    def __call__(self, j: int, column: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Quantize ``column`` (processing position ``j``); ``weight`` is the live weight in processing order."""
        if self.static:
            g = self.position_group[j]
            return self.spec.quantize(column, self.scale[:, g], self.zero[:, g])
        if j % self.blocksize == 0:  # a block starts: every column from j on holds its block-start value
            end = min(j + self.blocksize, weight.shape[1])
            for first in range(-(-j // self.width) * self.width, end, self.width):
                scale, zero = self.spec.fit(weight[:, first : first + self.width])
                self.scales.append(scale[:, 0])
                self.zeros.append(zero[:, 0])
        return self.spec.quantize(column, self.scales[j // self.width], self.zeros[j // self.width])

    def record(self) -> dict[str, Any]:
        if self.static:
            return record(self.spec, self.scale, self.zero, self.g_idx)
        return record(self.spec, torch.stack(self.scales, 1), torch.stack(self.zeros, 1), self.g_idx)
