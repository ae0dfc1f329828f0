"""Language similarity from per-language activation vectors of the dense model.

A language's *activation vector* at decoder layer i comes from one of two sources (``analysis.statistic``):
- ``linear``: the per-channel mean of x² over its text, where x is the input of the layer's first Linear group in call
  order (q/k/v; BLOOM: query_key_value), i.e. the output of the layer's input norm. It is exactly the Wanda statistic
  (ColumnSquares) the engine collects for that group, from one extra pass of the engine itself with a
  statistics-only probe in place of a compressor.
- ``residual``: the per-channel mean of the residual stream entering decoder layer i (the hidden state before the
  layer's norm; at layer 0 the embedding output), the MBS paper's "input of the first decoder layer", from the
  engine's own layer-by-layer pass with a probe that reads each dense layer's inputs (so a streamed model is served
  by the same code; equal to the model's forward hidden states, tested). The first position of every segment is
  left out: its residual norm (BOS, or the first token, an attention sink) is orders of magnitude above the rest and
  would dominate a mean.
Uncentred vectors share a large common component (every language's mean x² is dominated by the same channels), so
their cosines are all close to 1; the centred statistics subtract the mean vector of the evaluated languages (after
the log, for ``log_`` ones) so that what is compared is how a language differs from the others.

The probe is the dense model and a small fixed probe set: ``analysis.segments`` calibration-split segments of every
evaluated and calibration language, cut with ``analysis.seed``. So every job of a sweep gets the same vector for a
language (whatever its calibration mixture, compressor or seed), also for languages it does not calibrate on, and
layers past 0 are not shaped by the job's own compression. A run's *calibration-mixture vector* is the segment-count
weighted average of its calibration languages' raw vectors (what the statistic over the calibration set would be if
each language's text looked like its probe), transformed like the languages' vectors; every language's similarity
to the mixture is the cosine with it.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from mbs.compress.base import Compressor
from mbs.compress.engine import EngineConfig, compress_model
from mbs.compress.statistics import ColumnSquares
from mbs.data.calibration import CalibrationSet, build_calibration

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Statistic:
    """How a language's activation vector is formed: from which tensor, and how vectors are compared."""

    source: str  # "linear" (mean x² of the first Linear group's input) or "residual" (mean of the layer input)
    log: bool  # compare log vectors (mean squares only)
    centred: bool  # subtract the evaluated languages' mean vector
    description: str


STATISTICS = {
    "mean_square": Statistic("linear", False, False, "per-channel mean of x^2, x = the input of the decoder layer's "
                             "first Linear group (q/k/v: the input-norm output), dense model"),
    "mean_square_centred": Statistic("linear", False, True, "per-channel mean of x^2 at the q/k/v input (after the "
                                     "layer's input norm), minus the evaluated languages' mean vector, dense model"),
    "log_mean_square_centred": Statistic("linear", True, True, "log of the per-channel mean of x^2 at the q/k/v input "
                                         "(after the layer's input norm), minus the evaluated languages' mean of "
                                         "those logs, dense model"),
    "residual_mean": Statistic("residual", False, False, "per-channel mean of the residual stream entering the "
                               "decoder layer (before its norm; the MBS paper's definition at layer 0), first "
                               "position of each segment left out, dense model"),
    "residual_mean_centred": Statistic("residual", False, True, "per-channel mean of the residual stream entering "
                                       "the decoder layer (before its norm), first position left out, minus the "
                                       "evaluated languages' mean vector, dense model"),
}
DEFAULT_STATISTIC = "log_mean_square_centred"  # the best separating statistic on the default (README, measured)
LEGACY_STATISTIC = "mean_square"  # what results.json files from before analysis.statistic used
MIN_CENTRED_LANGUAGES = 3  # centring on two languages makes their vectors opposite: every cosine is ±1


def centring_problem(statistic: str, evaluated: list[str]) -> str | None:
    """Why a centred statistic cannot be formed here (too few evaluated languages to centre on), or None."""
    if STATISTICS[statistic].centred and len(evaluated) < MIN_CENTRED_LANGUAGES:
        return (f"analysis.statistic={statistic} centres on the evaluated languages and needs at least "
                f"{MIN_CENTRED_LANGUAGES}; eval.languages has {len(evaluated)} ({', '.join(evaluated)}): set "
                "analysis.statistic=mean_square or residual_mean for a similarity over fewer languages")
    return None


@dataclass
class AnalysisConfig:
    """``analysis`` in the run config: which layers' activation vectors to compare, and the probe set."""

    layers: list[int] = field(default_factory=lambda: [0, -1])  # negative: from the end; [] turns similarity off
    segments: int = 4  # probe segments (model.seqlen tokens each) per language, from the calibration split
    seed: int = 0  # the probe's own seed: the same probe in every job, whatever the run's seed
    statistic: str = DEFAULT_STATISTIC  # how a language's vector is formed (STATISTICS)

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise ValueError(f"analysis.statistic={self.statistic!r} is not known; allowed: {', '.join(STATISTICS)}")
        if self.segments < 1:
            raise ValueError(f"analysis.segments={self.segments} must be >= 1 (analysis.layers=[] turns the "
                             "similarity analysis off)")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"analysis.layers={list(self.layers)} names a layer twice")


def resolve_layers(layers: list[int], num_layers: int) -> list[int]:
    """Absolute layer indices (negative ones count from the end), or a one-line error naming the allowed range."""
    resolved = []
    for layer in layers:
        if not -num_layers <= layer < num_layers:
            raise ValueError(f"analysis.layers={list(layers)}: layer {layer} is out of range for a model with "
                             f"{num_layers} decoder layers; allowed: {-num_layers}..{num_layers - 1}")
        resolved.append(layer % num_layers)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"analysis.layers={list(layers)} names the same layer twice (model has {num_layers} layers)")
    return resolved


def probe_languages(eval_languages: list[str], counts: Mapping[str, int], available: list[str]) -> list[str]:
    """Evaluated languages, then calibration languages not evaluated; languages the corpus lacks are left out."""
    wanted = list(dict.fromkeys([*eval_languages, *(k for k, v in counts.items() if v)]))
    have = set(available)
    return [k for k in wanted if k in have]


def build_probe(tokenizer, corpus, languages: list[str], config: AnalysisConfig, seqlen: int, prepend_bos: bool,
                cache=None) -> CalibrationSet:
    """``config.segments`` seeded calibration-split segments per language (per-language seeds: a language's segments
    do not depend on which other languages are probed)."""
    try:
        return build_calibration(tokenizer, corpus, dict.fromkeys(languages, config.segments), seqlen, config.seed,
                                 prepend_bos, cache=cache)
    except ValueError as err:
        raise ValueError(f"analysis probe: {err} (analysis.layers=[] turns the similarity analysis off)") from err


@dataclass
class SimilarityProbe(Compressor):
    """Statistics only: the engine's pass collects per-language ColumnSquares; no weight is changed."""

    needs_statistics: ClassVar[bool] = True
    edits_weights: ClassVar[bool] = False

    def new_statistic(self, module: nn.Linear) -> ColumnSquares:
        return ColumnSquares(module.in_features, module.weight.device)

    def compress(self, name: str, module: nn.Linear, statistic: Any) -> dict[str, Any]:
        return {}


def language_vectors(model: nn.Module, probe: CalibrationSet, layers: list[int], engine: EngineConfig,
                     source: str = "linear") -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {language: raw vector}} (fp32) for absolute layer indices, from ``source`` (see the module docstring):
    the engine's observer ("linear") or the model's own forward ("residual")."""
    if source == "residual":
        return residual_vectors(model, probe, layers, engine)
    wanted = set(layers)
    vectors: dict[int, dict[str, torch.Tensor]] = {}

    def observer(index: int, group: str, by_language: dict) -> None:
        if index in wanted and index not in vectors:  # the first group observed is the first Linear called
            vectors[index] = {lang: (s.sum / s.tokens).cpu() for lang, s in by_language.items()}

    # the probe always runs the sequential engine, one statistic per language
    sequential = dataclasses.replace(engine, mode="sequential", statistics_pool=0, per_language_statistics=True)
    compress_model(model, SimilarityProbe(), probe, sequential, observer=observer, progress=False)
    return {i: vectors[i] for i in layers}


@dataclass
class ResidualProbe(Compressor):
    """Statistics only: the engine hands it each dense layer's calibration inputs (the residual stream entering the
    layer), which it sums per language in fp64 over every position but the first of each segment; no weight changes."""

    needs_layer_inputs: ClassVar[bool] = True
    edits_weights: ClassVar[bool] = False
    languages: list[str] = field(default_factory=list)  # the language of each calibration batch, in the engine's order
    layers: list[int] = field(default_factory=list)  # absolute indices of the layers whose inputs are summed
    sums: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def prepare_layer(self, layer: nn.Module, adapter: Any, inputs: list[torch.Tensor],
                      kwargs: list[dict[str, Any]]) -> dict[str, Any]:
        index = next(i for i, candidate in enumerate(adapter.layers) if candidate is layer)
        if index in self.layers:
            sums = self.sums.setdefault(index, {})
            for language, hidden in zip(self.languages, inputs, strict=True):
                part = hidden[:, 1:].double().sum(dim=(0, 1)).cpu()
                sums[language] = sums[language] + part if language in sums else part
        return {}

    def compress(self, name: str, module: nn.Linear, statistic: Any) -> dict[str, Any]:
        return {}


def residual_vectors(model: nn.Module, probe: CalibrationSet, layers: list[int], engine: EngineConfig
                     ) -> dict[int, dict[str, torch.Tensor]]:
    """Per-channel mean of the hidden state entering each decoder layer, over every position but the first of each
    segment, from the engine's own pass (in memory or streamed alike)."""
    sequential = dataclasses.replace(engine, mode="sequential", statistics_pool=0, per_language_statistics=True)
    batches = probe.batches(sequential.batch_size, by_language=True)
    tokens: dict[str, int] = {}
    for language, batch in batches:
        tokens[language] = tokens.get(language, 0) + batch.shape[0] * (batch.shape[1] - 1)
    reader = ResidualProbe(languages=[language for language, _ in batches], layers=list(layers))
    compress_model(model, reader, probe, sequential, progress=False)
    return {i: {k: (v / tokens[k]).float() for k, v in reader.sums[i].items()} for i in layers}


def transformed(vectors: Mapping[str, torch.Tensor], extra: Mapping[str, np.ndarray], statistic: Statistic,
                centre_languages: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The vectors as compared (fp64): log where the statistic says so, then minus the mean over
    ``centre_languages`` when centred; ``extra`` (e.g. the mixture vector) transformed the same way."""
    def one(v) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        return np.log(np.maximum(v, np.finfo(np.float64).tiny)) if statistic.log else v

    out = {k: one(v) for k, v in vectors.items()}
    more = {k: one(v) for k, v in extra.items()}
    if statistic.centred:
        centre = np.mean([out[k] for k in centre_languages if k in out], axis=0)
        out = {k: v - centre for k, v in out.items()}
        more = {k: v - centre for k, v in more.items()}
    return out, more


def cosine(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def cosine_matrix(vectors: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Pairwise cosine similarities in the order of ``vectors`` (fp64)."""
    m = np.stack([np.asarray(v, dtype=np.float64) for v in vectors.values()])
    m = m / np.linalg.norm(m, axis=1, keepdims=True)
    return m @ m.T


def mixture_vector(vectors: Mapping[str, torch.Tensor], counts: Mapping[str, int]) -> np.ndarray:
    """The calibration mixture's vector: the average of its languages' vectors weighted by their segment counts."""
    used = {k: v for k, v in counts.items() if v}
    missing = [k for k in used if k not in vectors]
    if missing:
        raise ValueError(f"no activation vector for calibration language(s) {', '.join(missing)}")
    total = sum(used.values())
    return sum(n / total * np.asarray(vectors[k], dtype=np.float64) for k, n in used.items())


def similarity_record(vectors: dict[int, dict[str, torch.Tensor]], requested: list[int],
                      counts: Mapping[str, int], probe: CalibrationSet, config: AnalysisConfig,
                      corpus: str, evaluated: list[str]) -> dict[str, Any]:
    """What results.json keeps: the statistic, and per layer (keyed by absolute index) the languages, their cosine
    matrix and each language's cosine with the calibration mixture. Centred statistics centre on ``evaluated``
    (the same languages in every job of a sweep)."""
    statistic = STATISTICS[config.statistic]
    layers = {}
    for (index, by_language), asked in zip(vectors.items(), requested):
        compared, extra = transformed(by_language, {"mixture": mixture_vector(by_language, counts)}, statistic,
                                      evaluated)
        layers[str(index)] = {"requested": asked, "languages": list(compared),
                              "matrix": cosine_matrix(compared).tolist(),
                              "to_calibration": {k: cosine(v, extra["mixture"]) for k, v in compared.items()}}
    return {"statistic": config.statistic, "description": statistic.description,
            "probe": {"corpus": corpus, "split": "calibration", "segments_per_language": config.segments,
                      "seqlen": int(next(iter(probe.segments.values())).shape[1]), "seed": config.seed},
            "calibration_counts": {k: v for k, v in counts.items() if v},
            "layers": layers}


@dataclass
class Separability:
    """How well a statistic tells languages apart: each language's vector from one text sample against every
    language's vector from another, disjoint sample."""

    retrieval: float  # share of (language, direction) pairs whose own other sample is the most similar
    gap: float  # (mean same-language cosine − mean other-language cosine) / std of the other-language cosines
    same: float  # mean same-language cosine
    other: float  # mean other-language cosine
    languages: int


def separability(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor], statistic: str
                 ) -> Separability:
    """``first`` and ``second``: raw vectors of the same languages from two disjoint samples; each sample is
    transformed (and centred on its own languages) as the statistic says, then compared across samples."""
    kind = STATISTICS[statistic]
    languages = [k for k in first if k in second]
    a, _ = transformed({k: first[k] for k in languages}, {}, kind, languages)
    b, _ = transformed({k: second[k] for k in languages}, {}, kind, languages)
    ma = np.stack([a[k] for k in languages])
    mb = np.stack([b[k] for k in languages])
    sim = (ma / np.linalg.norm(ma, axis=1, keepdims=True)) @ (mb / np.linalg.norm(mb, axis=1, keepdims=True)).T
    n = len(languages)
    off = ~np.eye(n, dtype=bool)
    diag = np.diag(sim)
    hits = [diag[i] > sim[i, off[i]].max() for i in range(n)] + [diag[i] > sim[off[:, i], i].max() for i in range(n)]
    others = sim[off]
    return Separability(float(np.mean(hits)), float((diag.mean() - others.mean()) / others.std()),
                        float(diag.mean()), float(others.mean()), n)
