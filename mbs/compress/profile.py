"""Non-uniform layer sparsity (``compressor.layer_sparsity``): how many weights each pruned matrix loses when the
layers do not all get the target sparsity, with the global count over the pruned Linear maps kept exact.

OWL (Yin et al., ICML 2024, arXiv 2310.05175, Sec. 3.2-3.3), with the Wanda score A_ij = |W_ij|·||X_j||₂ of the
*dense* model (every Linear map of decoder layer l, its inputs from the dense earlier layers):

- layerwise outlier distribution (Sec. 3.2): D_l = Σ_ij 1[A_ij > M·Ā_l] / (number of A_ij in layer l), Ā_l the mean
  score over the whole layer (all its matrices' scores taken together, as ``check_outlier_mean`` in the reference's
  lib/prune_all.py does);
- layer sparsity (Sec. 3.3): S_l = 1 − D'_l with D'_l ∝ D_l held within [S − λ, S + λ] and averaging to S. The paper
  does not spell out the map; the reference code's is used: x_l = 2λ·(D_l − min D)/(max D − min D) ∈ [0, 2λ], then
  S_l = S − (x_l − mean x). Choices made here where the paper and code leave things open: the mean of x is weighted by
  each layer's pruned parameters (equal to the code's plain mean when layers are the same size, as in every decoder
  the reference supports), so Σ S_l·P_l = S·P; equal D_l everywhere (max = min, a division by zero in the code)
  gives the uniform profile.

Exact global sparsity: the total number of zeros is round(S·P) over the P weights of the pruned matrices; it is split
over layers in proportion to S_l·P_l and within a layer over its matrices in proportion to their sizes, by cumulative
rounding (:func:`split`), so the achieved global sparsity is round(S·P)/P whatever the profile (uniform pruning keeps
its own per-row counts, int(in_features·S) per row, as the references do).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

PROFILES = ("uniform", "owl")


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """OWL's D_l: the fraction of the layer's scores above ``m`` times their mean (all matrices taken together)."""
    total = sum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    threshold = m * total / count
    return sum(int((s.double() > threshold).sum()) for s in scores) / count


def owl_sparsities(ratios: Sequence[float], params: Sequence[int], sparsity: float, lam: float) -> list[float]:
    """OWL's S_l from the layers' outlier ratios D_l: min-max scaled to [0, 2λ] and centred so that the parameter-
    weighted mean sparsity is ``sparsity`` (more outliers, lower sparsity)."""
    low, high = min(ratios), max(ratios)
    if high == low:
        return [sparsity] * len(ratios)
    x = [2 * lam * (r - low) / (high - low) for r in ratios]
    mean = sum(xi * p for xi, p in zip(x, params)) / sum(params)
    return [sparsity - (xi - mean) for xi in x]


def split(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` as integers proportional to ``weights`` (non-negative), summing to ``total`` exactly: each part is
    the difference of the rounded cumulative shares, so no part is off its share by more than one."""
    whole = float(sum(weights))
    if total == 0 or whole == 0:
        return [0] * len(weights)
    out, before, cumulative = [], 0, 0.0
    for i, w in enumerate(weights):
        cumulative += w
        edge = total if i == len(weights) - 1 else min(total, math.floor(total * cumulative / whole + 0.5))
        out.append(edge - before)
        before = edge
    return out


def zero_budgets(layer_sparsities: Sequence[float], modules: Sequence[Mapping[str, int]],
                 sparsity: float) -> dict[str, int]:
    """{module full name: zeros to prune}: round(S·P) zeros over all modules, split over layers by S_l·P_l and
    within each layer by module size (``modules``: per layer, {full name: parameters})."""
    sizes = [sum(layer.values()) for layer in modules]
    total = math.floor(sparsity * sum(sizes) + 0.5)
    per_layer = split(total, [s * p for s, p in zip(layer_sparsities, sizes)])
    budgets: dict[str, int] = {}
    for zeros, layer in zip(per_layer, modules):
        for (name, size), k in zip(layer.items(), split(zeros, list(layer.values()))):
            if k > size:
                raise ValueError(f"{name}: the layer profile asks for {k} zeros of {size} weights")
            budgets[name] = k
    return budgets
