"""What SparseGPT and GPTQ share: preparing the Hessian (dead inputs, damping, the upper Cholesky factor of its
inverse, with a louder retry when the factorisation fails) and the sequential column sweep that turns each column's
rounding or pruning error into an update of the columns not yet processed (lazy, in blocks)."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mbs.compress.statistics import Hessian

log = logging.getLogger(__name__)

DAMP_RETRIES = 4  # percdamp ×10 each time: 0.01 → 0.1 → 1 → 10 → 100
DAMP_FACTOR = 10.0


def check_solver(percdamp: float, blocksize: int) -> None:
    """Config checks shared by the Hessian-based compressors."""
    if not percdamp > 0:
        raise ValueError(f"compressor.percdamp={percdamp} must be > 0 (a fraction of mean(diag H), e.g. 0.01)")
    if blocksize < 1:
        raise ValueError(f"compressor.blocksize={blocksize} must be >= 1 (e.g. 128)")


@dataclass
class HessianSolver:
    """Config and statistic shared by the compressors that solve against the inputs' Hessian (SparseGPT, GPTQ);
    listed before the compressor's own base so its fields and checks join that base's."""

    needs_statistics: ClassVar[bool] = True

    percdamp: float = 0.01
    blocksize: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]  # the compressor base's own checks first
        check_solver(self.percdamp, self.blocksize)

    def new_statistic(self, module: nn.Linear) -> Hessian:
        return Hessian(module.in_features, module.weight.device)

    def damping_figures(self, prepared: "Factorized") -> dict[str, Any]:
        """The damping actually used, recorded only when a failed factorisation forced it up."""
        return {"percdamp": prepared.percdamp} if prepared.percdamp != self.percdamp else {}


@dataclass
class Factorized:
    weight: torch.Tensor  # fp32 copy of the weight: dead columns zeroed, columns in processing order
    hinv: torch.Tensor  # upper Cholesky factor of (H + damp·I)⁻¹, in processing order
    perm: torch.Tensor | None  # processing position -> original column (act-order), or None
    percdamp: float  # the damping that worked


def inverse_upper_factor(h: torch.Tensor) -> torch.Tensor | None:
    """The upper Cholesky factor U of h⁻¹ (UᵀU = h⁻¹), or None when h is not positive definite.

    With J the reversal permutation, J·h·J = L·Lᵀ gives h = Ũ·Ũᵀ with Ũ = J·L·J upper triangular, so
    h⁻¹ = Ũ⁻ᵀ·Ũ⁻¹ and U = Ũ⁻¹: one Cholesky and one triangular solve, instead of the reference's Cholesky, inverse
    and second Cholesky (faster; the same factor up to rounding)."""
    lower, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if info:
        return None
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.solve_triangular(lower.flip(0, 1), eye, upper=True)


def inverse_cholesky(h: torch.Tensor, percdamp: float, name: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (h + percdamp·mean(diag h)·I)⁻¹; ``h`` is left untouched.

    When a factorisation fails the damping is raised ×10 (up to DAMP_RETRIES times) with a warning naming the module;
    if every try fails it raises: never a silent fallback to another algorithm."""
    mean_diag = float(h.diagonal().mean())
    damp = percdamp
    for attempt in range(DAMP_RETRIES + 1):
        damped = h.clone()
        damped.diagonal().add_(damp * mean_diag)
        upper = inverse_upper_factor(damped)
        if upper is not None and bool(torch.isfinite(upper).all()):
            return upper, damp
        if attempt < DAMP_RETRIES:
            log.warning("%s: Cholesky of the damped Hessian failed with percdamp=%g; retrying with percdamp=%g",
                        name, damp, damp * DAMP_FACTOR)
            damp *= DAMP_FACTOR
    raise RuntimeError(f"{name}: the Hessian is not positive definite even with percdamp={damp:g} "
                       f"({DAMP_RETRIES} retries); check the calibration data for NaN/inf activations")


def factorize(statistic: Hessian, weight: torch.Tensor, percdamp: float, name: str, actorder: bool = False) -> Factorized:
    """Dead inputs (diag H = 0: never active) get diag 1 and their weight column zeroed, as they cannot be
    compensated; act-order permutes columns by decreasing diag H; then damping and the inverse Cholesky factor.
    The (possibly shared) statistic is never modified."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32  # fp32, or float64 kept (tests)
    h = statistic.matrix.to(weight.device, dtype)
    w = weight.detach().to(dtype).clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    perm = None
    if actorder:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    hinv, used = inverse_cholesky(h, percdamp, name)
    return Factorized(w, hinv, perm, used)


# block hook: (start, end, W[:, start:end] view, diag of the block's hinv) -> None (e.g. choose the block's mask)
BlockFn = Callable[[int, int, torch.Tensor, torch.Tensor], None]
# column fn: (position, live column, live weight) -> the column's final values, a new tensor (not a view)
ColumnFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]

INNER = 32  # columns updated one by one before the rest of the block gets their errors as one product


def inner_size(blocksize: int, lookahead: tuple[int, ...] = ()) -> int:
    """The sub-block width the sweep may use without changing what any column fn sees.

    A column fn that looks ahead (SparseGPT's N:M group, scored on the live weights when its first column comes) must
    find the columns it reads as updated as in a column-by-column sweep: true when each look-ahead span either fits in
    one sub-block or starts at a sub-block boundary, i.e. when span and sub-block width divide one another."""
    inner = INNER if blocksize % INNER == 0 else blocksize
    if all(span % inner == 0 or inner % span == 0 for span in lookahead):
        return inner
    return blocksize


def sweep(weight: torch.Tensor, hinv: torch.Tensor, blocksize: int, column: ColumnFn,
          block: BlockFn | None = None, lookahead: tuple[int, ...] = ()) -> torch.Tensor:
    """Process columns left to right: each column is replaced by ``column(...)`` (pruned and/or quantized) and the
    error, divided by the Cholesky diagonal, is propagated to the columns not yet processed, lazily at two levels:
    one by one within a sub-block of INNER columns, as one product from each sub-block to the rest of its block, and
    as one product from each block to the columns after it. The arithmetic is the reference's (SparseGPT/GPTQ with
    lazy blocks), summed in a different order; the two levels keep the per-column updates on a slab that stays in
    cache instead of re-reading the whole block for every column. Columns are processed as contiguous rows of the
    transposed weight; column fns see the live weight as [rows, cols] (a view). ``lookahead``: the widths of the
    column spans a column fn reads ahead of its position (see inner_size). ``weight`` is updated in place and
    returned."""
    cols = weight.shape[1]
    inner = inner_size(blocksize, lookahead)
    wt = weight.T.contiguous()  # [cols, rows]: column j is the contiguous row wt[j]
    live = wt.T
    err = torch.empty_like(wt)  # scaled errors, row j for column j
    diag = hinv.diagonal().tolist()
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        if block is not None:
            block(start, end, live[:, start:end], hinv.diagonal()[start:end])
        for s0 in range(start, end, inner):
            s1 = min(s0 + inner, end)
            for j in range(s0, s1):
                current = wt[j]
                final = column(j, current, live)
                e = torch.sub(current, final, out=err[j]).div_(diag[j])
                if j + 1 < s1:
                    wt[j + 1 : s1].addr_(hinv[j, j + 1 : s1], e, alpha=-1.0)
                current.copy_(final)
            if s1 < end:
                wt[s1:end].addmm_(hinv[s0:s1, s1:end].T, err[s0:s1], alpha=-1.0)
        if end < cols:
            wt[end:].addmm_(hinv[start:end, end:].T, err[start:end], alpha=-1.0)
    weight.copy_(live)
    return weight
