"""What SparseGPT and GPTQ share: preparing the Hessian (dead inputs, damping, the upper Cholesky factor of its
inverse, with a louder retry when the factorisation fails) and the sequential column sweep that turns each column's
rounding or pruning error into an update of the columns not yet processed (lazy, in blocks)."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

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
class Prepared:
    weight: torch.Tensor  # fp32 copy of the weight: dead columns zeroed, columns in processing order
    hinv: torch.Tensor  # upper Cholesky factor of (H + damp·I)⁻¹, in processing order
    perm: torch.Tensor | None  # processing position -> original column (act-order), or None
    percdamp: float  # the damping that worked


def inverse_cholesky(h: torch.Tensor, percdamp: float, name: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (h + percdamp·mean(diag h)·I)⁻¹; ``h`` is left untouched.

    When a factorisation fails the damping is raised ×10 (up to DAMP_RETRIES times) with a warning naming the module;
    if every try fails it raises: never a silent fallback to another algorithm."""
    mean_diag = float(h.diagonal().mean())
    damp = percdamp
    for attempt in range(DAMP_RETRIES + 1):
        damped = h.clone()
        damped.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if not info:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if not info and bool(torch.isfinite(upper).all()):
                return upper, damp
        if attempt < DAMP_RETRIES:
            log.warning("%s: Cholesky of the damped Hessian failed with percdamp=%g; retrying with percdamp=%g",
                        name, damp, damp * DAMP_FACTOR)
            damp *= DAMP_FACTOR
    raise RuntimeError(f"{name}: the Hessian is not positive definite even with percdamp={damp:g} "
                       f"({DAMP_RETRIES} retries); check the calibration data for NaN/inf activations")


def prepare(statistic: Hessian, weight: torch.Tensor, percdamp: float, name: str, actorder: bool = False) -> Prepared:
    """Dead inputs (diag H = 0: never active) get diag 1 and their weight column zeroed, as they cannot be
    compensated; act-order permutes columns by decreasing diag H; then damping and the inverse Cholesky factor.
    The (possibly shared) statistic is never modified."""
    h = statistic.matrix.to(weight.device)
    w = weight.detach().float().clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    perm = None
    if actorder:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    hinv, used = inverse_cholesky(h, percdamp, name)
    return Prepared(w, hinv, perm, used)


# block hook: (start, end, W[:, start:end] view, diag of the block's hinv) -> None (e.g. choose the block's mask)
BlockFn = Callable[[int, int, torch.Tensor, torch.Tensor], None]
# column fn: (position, live column, live weight) -> the column's final values, a new tensor (not a view)
ColumnFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def sweep(weight: torch.Tensor, hinv: torch.Tensor, blocksize: int, column: ColumnFn,
          block: BlockFn | None = None) -> torch.Tensor:
    """Process columns left to right: each column is replaced by ``column(...)`` (pruned and/or quantized) and the
    error, divided by the Cholesky diagonal, is propagated to the later columns of its block at once and to the
    columns after the block lazily, as one matrix product per block. ``weight`` is updated in place and returned."""
    cols = weight.shape[1]
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        w1 = weight[:, start:end]
        h1 = hinv[start:end, start:end]
        d1 = h1.diagonal()
        if block is not None:
            block(start, end, w1, d1)
        err = torch.empty_like(w1)
        for i in range(end - start):
            current = w1[:, i]
            final = column(start + i, current, weight)
            e = (current - final) / d1[i]
            w1[:, i:].sub_(e[:, None] * h1[i, i:][None, :])
            w1[:, i] = final
            err[:, i] = e
        if end < cols:
            weight[:, end:].sub_(err @ hinv[start:end, end:])
    return weight
