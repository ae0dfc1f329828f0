"""Predicted damage per language, before compressing: which languages a calibration set puts at risk.

For a candidate calibration mixture the model is compressed from the mixture's dense statistics (the cached mode's,
mbs/compress/cached.py: no forward once a language's statistics are cached), every layer at once. The predicted
damage of a target language is then the log perplexity ratio, compressed over dense, on ``risk.probe`` segments of
that language's *calibration* text drawn after the ``risk.segments`` segments the statistics hold (never the
evaluation windows); every weight is put back afterwards. This costs two forwards of the probe segments (the dense
one once per predictor), and it ranks languages: a language's sensitivity to the same relative error differs
(per-token log ratios of languages split into many short tokens move little), which an error in weight space alone
does not see (README, Predicted damage, gives the measurements that chose it).

Beside it, per compressed matrix, the relative output error on the language's own dense channel norms,

    e = ||ΔW·diag(||x||)||²_F / ||W·diag(||x||)||²_F = Σ_j ||ΔW_:j||² s_j / Σ_j ||W_:j||² s_j,   s = Σx² per channel,

from the language's first ``risk.segments`` calibration segments; a layer's error is the mean of its matrices' errors
and ``output_error`` the mean over layers (per-layer errors are kept in results.json). It needs no forward, follows
how a mixture changes one language's damage, and does not rank languages.

The statistics are the dense model's (each layer on dense inputs), as the cached mode's are: for a sequential run the
prediction describes the compression of the same mixture without the earlier layers' errors propagated.
Compressors that need full Hessians (SparseGPT, GPTQ) are not predicted: their statistic is width² per segment and
language, the cached statistics keep vectors.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from mbs.compress.base import Compressor
from mbs.compress.cached import LanguageStatistics, compress_layer_from_sums, plan_from_sums
from mbs.compress.engine import module_names
from mbs.compress.statistics import ColumnSquares
from mbs.models.adapter import Adapter

METHOD = ("log perplexity ratio on each language's probe segments (calibration text after the statistics' "
          "segments) of the model compressed from the mixture's dense statistics")
OUTPUT_ERROR = ("relative output error ||dW diag(||x||)||^2 / ||W diag(||x||)||^2 with each language's own dense "
                "channel norms (calibration text), mean over a layer's matrices, then mean over layers")


@dataclass
class RiskConfig:
    """``risk`` in the run config: the predicted damage of each evaluated language before compressing."""

    # off by default: on the embedded default its first run costs about as much as the compression (README)
    predict: bool = False
    segments: int = 8  # calibration segments per language: each target's statistics, and the mixture's per language
    probe: int = 4  # segments per language the predicted log ratio is measured on, drawn after the statistics' ones

    def __post_init__(self) -> None:
        for key in ("segments", "probe"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"risk.{key}={value!r} must be an integer >= 1 (calibration segments per language; "
                                 f"risk.predict=false turns the prediction off)")


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


@contextmanager
def compressed_from_sums(model: nn.Module, compressor: Compressor, mixed: Mapping[str, torch.Tensor],
                         leaders: Mapping[str, Mapping[str, str]], tokens: int
                         ) -> Iterator[dict[tuple[int, str], torch.Tensor]]:
    """``model`` compressed in place from the mixture's Σx² ``mixed`` (``tokens`` tokens; groups ``leaders`` as
    :meth:`LanguageStatistics.mixture` gives them) while the block runs, every layer from the same dense statistics;
    yields the dense weight of each (layer, matrix), and puts every weight back on leaving."""
    adapter = Adapter(model)
    full = module_names(model)
    originals: dict[tuple[int, str], torch.Tensor] = {}
    try:
        with torch.no_grad():
            if compressor.needs_profile:
                plan_from_sums(adapter, compressor, dict(mixed), dict(leaders), full)
            for i, layer in enumerate(adapter.layers):
                linears = adapter.linears(layer)
                originals.update({(i, name): m.weight.detach().clone() for name, m in linears.items()})
                compress_layer_from_sums(adapter, i, full[id(layer)], linears, compressor, dict(mixed),
                                         dict(leaders) if compressor.needs_statistics else {}, tokens)
        yield originals
    finally:
        with torch.no_grad():
            for i, layer in enumerate(adapter.layers):
                for name, m in adapter.linears(layer).items():
                    if (i, name) in originals:
                        m.weight.data.copy_(originals[i, name])


@torch.no_grad()
def layer_errors(model: nn.Module, originals: Mapping[tuple[int, str], torch.Tensor],
                 leaders: Mapping[str, Mapping[str, str]],
                 targets: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, list[float]]:
    """{language: [relative output error of each layer]} of the compressed ``model`` against its dense weights
    ``originals``, weighed by each target's Σx² (module docstring)."""
    adapter = Adapter(model)
    errors: dict[str, list[float]] = {language: [] for language in targets}
    for i, layer in enumerate(adapter.layers):
        linears = adapter.linears(layer)
        removed = {name: (m.weight.detach().double() - originals[i, name].double()).square().sum(0)
                   for name, m in linears.items()}
        kept = {name: originals[i, name].double().square().sum(0) for name in linears}
        group = leaders[str(i)]
        for language, sums in targets.items():
            per_matrix = []
            for name in linears:
                s = sums[f"{i}.{group[name]}"].to(removed[name].device, torch.float64)
                per_matrix.append(float(removed[name] @ s / (kept[name] @ s)))
            errors[language].append(sum(per_matrix) / len(per_matrix))
    return errors


def aggregate(per_layer: Mapping[str, list[float]]) -> dict[str, float]:
    """One output error per language: the mean of its layers' errors."""
    return {language: sum(errors) / len(errors) for language, errors in per_layer.items()}


@dataclass
class Assessment:
    """What a candidate mixture is predicted to do to each target."""

    log_ratio: dict[str, float]  # the predicted damage: log perplexity ratio on the target's probe segments
    per_layer: dict[str, list[float]]  # each layer's relative output error

    @property
    def output_error(self) -> dict[str, float]:
        return aggregate(self.per_layer)


class DamagePredictor:
    """Predicted damage of any calibration mixture for a fixed set of target languages, from cached dense statistics:
    the targets' sums, probe segments and dense losses are formed once; each prediction compresses from the
    mixture's sums (no statistics forward) and forwards the probes once."""

    def __init__(self, model: nn.Module, compressor: Compressor, statistics: LanguageStatistics, targets: list[str],
                 segments: int, probe: int = 4, device: str = "cpu", dtype: str = "float32-head") -> None:
        if statistics.pool != segments:
            raise ValueError(f"the statistics pool ({statistics.pool}) must be the prediction's segments ({segments})")
        self.model, self.compressor, self.statistics, self.segments = model, compressor, statistics, segments
        self.device, self.dtype = device, dtype
        self.targets: dict[str, dict[str, torch.Tensor]] = {}
        self.probes: dict[str, list[torch.Tensor]] = {}
        self.skipped: dict[str, str] = {}  # target -> why it has no statistics (e.g. too little calibration text)
        for language in targets:
            try:
                self.targets[language] = language_sums(statistics, language, segments)
                self.probes[language] = list(statistics.source.segments(language, segments + probe)[segments:])
            except ValueError as err:
                self.targets.pop(language, None)
                self.skipped[language] = str(err)
        self._dense: dict[str, float] | None = None

    def _losses(self) -> dict[str, float]:
        from mbs.evaluate.perplexity import evaluate_languages

        losses = evaluate_languages(self.model, self.probes, self.device, progress=False, dtype=self.dtype)
        return {k: v.mean_nll for k, v in losses.items()}

    def assess(self, counts: Mapping[str, int], probe: bool = True) -> Assessment:
        """Each target's predicted log ratio (``probe``; else none, and no forward) and per-layer output errors
        under the compression calibrated on ``counts`` segments; the model is left as it was."""
        if probe and self._dense is None:
            self._dense = self._losses()
        mixed: dict[str, torch.Tensor] = {}
        if self.compressor.needs_statistics or self.compressor.needs_profile:  # magnitude, rtn: the mixture is moot
            mixed, _ = self.statistics.mixture(dict(counts))
        tokens = sum(counts.values()) * self.statistics.source.seqlen
        with compressed_from_sums(self.model, self.compressor, mixed, self.statistics.leaders, tokens) as originals:
            per_layer = layer_errors(self.model, originals, self.statistics.leaders, self.targets)
            compressed = self._losses() if probe else {}
        return Assessment({k: compressed[k] - self._dense[k] for k in self.targets} if probe else {}, per_layer)

    def predict(self, counts: Mapping[str, int]) -> dict[str, float]:
        """Each target's predicted damage (log ratio on its probe segments) under ``counts``."""
        return self.assess(counts).log_ratio

    def extrapolate(self, anchor: Assessment, counts: Mapping[str, int]) -> dict[str, float]:
        """Each target's log ratio under ``counts`` extrapolated from an assessed mixture without a forward: the
        anchor's probe log ratio times the ratio of the output errors, r_A · e(counts) / e_A. The probe ranks the
        languages, the output error follows how a change of mixture moves each one (README, Predicted damage)."""
        error = self.assess(counts, probe=False).output_error
        return {k: anchor.log_ratio[k] * error[k] / anchor.output_error[k] for k in self.targets}


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
