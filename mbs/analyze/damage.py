"""Predicted damage per language, before compressing: which languages a calibration set puts at risk.

For a candidate calibration mixture the model is compressed layer by layer from the mixture's dense statistics (the
cached mode's, mbs/compress/cached.py: no forward once a language's statistics are cached) and every weight is put
back at once. For every target language, from that language's *own* dense statistics Σx² (its calibration text,
never the evaluation windows), each compressed matrix's relative output error is

    e = ||ΔW·diag(||x||)||²_F / ||W·diag(||x||)||²_F = Σ_j ||ΔW_:j||² s_j / Σ_j ||W_:j||² s_j,   s = Σx² per channel,

the share of the matrix's output energy on that language's inputs the compression removes, taken with the diagonal of
the input second moment (the channel norms Wanda scores with). A layer's error is the mean of its matrices' errors
(matrices differ in input scale, so a sum would be the largest one's), and the predicted damage of the language is
the mean of its layers' errors. The per-layer errors are kept (results.json), so other aggregations can be formed.

The statistics are the dense model's (each layer on dense inputs), as the cached mode's are: for a sequential run the
prediction describes the compression of the same mixture without the earlier layers' errors propagated.
Compressors that need full Hessians (SparseGPT, GPTQ) are not predicted: their statistic is width² per segment and
language, the cached statistics keep vectors.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from mbs.compress.base import Compressor
from mbs.compress.cached import LanguageStatistics, compress_layer_from_sums, plan_from_sums
from mbs.compress.engine import module_names
from mbs.compress.statistics import ColumnSquares
from mbs.models.adapter import Adapter

METHOD = ("relative output error ||dW diag(||x||)||^2 / ||W diag(||x||)||^2 with each language's own dense channel "
          "norms (calibration text), mean over a layer's matrices, then mean over layers")


@dataclass
class RiskConfig:
    """``risk`` in the run config: the predicted damage of each evaluated language before compressing."""

    # off by default: on the embedded default its first run costs about as much as the compression (README)
    predict: bool = False
    segments: int = 8  # calibration segments per language: each target's statistics, and the mixture's per language

    def __post_init__(self) -> None:
        if isinstance(self.segments, bool) or not isinstance(self.segments, int) or self.segments < 1:
            raise ValueError(f"risk.segments={self.segments!r} must be an integer >= 1 (calibration segments per "
                             f"language; risk.predict=false turns the prediction off)")


def unsupported(compressor: Compressor, model: nn.Module) -> str | None:
    """Why this compression's damage cannot be predicted from vector statistics (on the skeleton), or None."""
    name = type(compressor).__name__.lower()
    if compressor.is_noop:
        return f"compressor {name} changes no weight: nothing to predict"
    if compressor.needs_layer_inputs:
        return f"compressor {name} rewrites each layer from its calibration inputs, which the prediction does not hold"
    if compressor.needs_statistics:
        probe = compressor.new_statistic(nn.Linear(2, 2, device="meta"))
        if not isinstance(probe, ColumnSquares):
            return (f"compressor {name} compresses from {type(probe).__name__} statistics (width² per language), "
                    f"which the prediction does not hold; predicted: wanda, magnitude, rtn")
    adapter = Adapter(model)
    if any(adapter.routed(layer) for layer in adapter.layers):
        return "the model routes tokens to experts: which tokens an expert sees is not separable by language"
    return None


def language_sums(statistics: LanguageStatistics, language: str, segments: int) -> dict[str, torch.Tensor]:
    """Σx² over the language's first ``segments`` calibration segments, per ``"<layer>.<group leader>"`` (fp64)."""
    return {k: v.double().sum(0) for k, v in statistics.segments(language, segments).items()}


@torch.no_grad()
def layer_errors(model: nn.Module, compressor: Compressor, mixed: Mapping[str, torch.Tensor],
                 leaders: Mapping[str, Mapping[str, str]], tokens: int,
                 targets: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, list[float]]:
    """{language: [relative output error of each layer]} of compressing ``model`` from the mixture's Σx² ``mixed``
    (``tokens`` tokens; groups ``leaders`` as :meth:`LanguageStatistics.mixture` gives them), weighed by each
    target's Σx². Every layer's weights are restored before the next is compressed: the model is left as it was."""
    adapter = Adapter(model)
    full = module_names(model)
    if compressor.needs_profile:
        plan_from_sums(adapter, compressor, dict(mixed), dict(leaders), full)
    errors: dict[str, list[float]] = {language: [] for language in targets}
    for i, layer in enumerate(adapter.layers):
        linears = adapter.linears(layer)
        originals = {name: m.weight.detach().clone() for name, m in linears.items()}
        try:
            compress_layer_from_sums(adapter, i, full[id(layer)], linears, compressor, dict(mixed),
                                     dict(leaders) if compressor.needs_statistics else {}, tokens)
            removed = {name: (m.weight.detach().double() - originals[name].double()).square().sum(0)
                       for name, m in linears.items()}
        finally:
            for name, m in linears.items():
                m.weight.data.copy_(originals[name])
        kept = {name: originals[name].double().square().sum(0) for name in linears}
        group = leaders[str(i)]
        for language, sums in targets.items():
            per_matrix = []
            for name in linears:
                s = sums[f"{i}.{group[name]}"].to(removed[name].device, torch.float64)
                per_matrix.append(float(removed[name] @ s / (kept[name] @ s)))
            errors[language].append(sum(per_matrix) / len(per_matrix))
    return errors


def aggregate(per_layer: Mapping[str, list[float]]) -> dict[str, float]:
    """One predicted damage per language: the mean of its layers' errors."""
    return {language: sum(errors) / len(errors) for language, errors in per_layer.items()}


class DamagePredictor:
    """Predicted damage of any calibration mixture for a fixed set of target languages, from cached dense statistics:
    the targets' sums are formed once; each prediction compresses from the mixture's sums (no forward)."""

    def __init__(self, model: nn.Module, compressor: Compressor, statistics: LanguageStatistics, targets: list[str],
                 segments: int) -> None:
        if statistics.pool != segments:
            raise ValueError(f"the statistics pool ({statistics.pool}) must be the prediction's segments ({segments})")
        self.model, self.compressor, self.statistics, self.segments = model, compressor, statistics, segments
        self.targets: dict[str, dict[str, torch.Tensor]] = {}
        self.skipped: dict[str, str] = {}  # target -> why it has no statistics (e.g. too little calibration text)
        for language in targets:
            try:
                self.targets[language] = language_sums(statistics, language, segments)
            except ValueError as err:
                self.skipped[language] = str(err)

    def per_layer(self, counts: Mapping[str, int]) -> dict[str, list[float]]:
        """{target: [each layer's relative output error]} of the compression calibrated on ``counts`` segments."""
        mixed: dict[str, torch.Tensor] = {}
        if self.compressor.needs_statistics or self.compressor.needs_profile:  # magnitude, rtn: the mixture is moot
            mixed, _ = self.statistics.mixture(dict(counts))
        tokens = sum(counts.values()) * self.statistics.source.seqlen
        return layer_errors(self.model, self.compressor, mixed, self.statistics.leaders, tokens, self.targets)

    def predict(self, counts: Mapping[str, int]) -> dict[str, float]:
        return aggregate(self.per_layer(counts))


def spearman_or_none(predicted: Mapping[str, float], measured: Mapping[str, float]) -> float | None:
    """Spearman's ρ over the languages both hold (None with fewer than 3, or when either side is constant)."""
    from mbs.analyze.retention import spearman

    common = [k for k in predicted if k in measured]
    x = [predicted[k] for k in common]
    y = [measured[k] for k in common]
    if len(common) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    rho = spearman(x, y)
    return None if math.isnan(rho) else rho
