"""``engine.mode=cached``: compress from per-language statistics of the *dense* model, kept on disk and mixed by
segment counts, so a calibration-mixture sweep pays its statistics forwards once instead of once per job.

Each language's calibration sample is cut into blocks of ``BLOCK`` segments (segment i is the same whatever count a
mixture asks for: :func:`mbs.data.calibration.language_segments`). A block is forwarded once through the dense model
(one batch, so its numbers never depend on what else a job needs) with every decoder layer's Linear inputs observed,
and each segment's statistic is kept apart: for Wanda, Σx² per input channel of every input group (q/k/v share one),
[BLOCK, width] fp32 per layer and group (the README gives the size per block). A job loads the blocks its
counts need (computing the missing ones), sums each language's first ``count`` segments in fp64 and compresses every
module from that mixture's statistic, with no further forward. ``engine.statistics_pool=N`` caps the segments
forwarded per language: a count above N is covered by the language's first N segments scaled by count/N (the
mixture's weights on per-language means), so a sweep over any mixtures of L languages forwards at most L·N segments
in all.

This is the *non-sequential* variant: every layer's statistic comes from dense-model inputs, not from inputs that
the already-compressed earlier layers produced, as in the sequential engine (the default, and the reference; the
sweep benchmark reports how far the two are apart per language). Statistics that are sums of per-token vectors
(Wanda's; magnitude needs none) are supported; Hessians would need width² per segment, so SparseGPT and GPTQ refuse this mode. Models that route tokens to experts refuse it too
(which tokens an expert sees is not separable by segment through the observers). A layer sparsity profile
(``compressor.layer_sparsity=owl``) is planned from the same dense statistics, with no forward of its own.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mbs.cache import Cache
from mbs.compress.base import Compressor, Statistic
from mbs.compress.engine import (CompressionReport, EngineConfig, InputGroups, PipelineContext, check_modules,
                                 check_profile, layer_profile_figure, module_names)
from mbs.compress.registry import register_pipeline
from mbs.compress.statistics import ColumnSquares
from mbs.compress.step import compress_layer, layer_record
from mbs.data.calibration import CalibrationSet, SegmentSource
from mbs.fingerprint import numeric_environment
from mbs.models.adapter import Adapter

log = logging.getLogger(__name__)

BLOCK = 8  # segments per forward and per cache entry
VERSION = 1  # bump when what a block holds changes


def check_cached(compressor: Compressor, model: nn.Module) -> None:
    """One-line errors, on the model skeleton, for what the cached mode cannot do."""
    name = type(compressor).__name__.lower()
    if compressor.needs_layer_inputs:
        raise ValueError(f"engine.mode=cached keeps per-segment vector statistics; compressor {name!r} searches each "
                         f"layer on its calibration inputs; use engine.mode=sequential")
    if compressor.needs_statistics:
        probe = compressor.new_statistic(nn.Linear(2, 2, device="meta"))
        if not isinstance(probe, ColumnSquares):
            raise ValueError(f"engine.mode=cached keeps per-segment vector statistics; compressor {name!r} needs "
                             f"{type(probe).__name__} (width² per segment); allowed with it: wanda, magnitude, dense "
                             f"(or engine.mode=sequential)")
    check_profile(compressor, model)
    adapter = Adapter(model)
    if any(adapter.routed(layer) for layer in adapter.layers):
        raise ValueError("engine.mode=cached cannot split expert statistics by segment for a model that routes tokens "
                         "to experts; use engine.mode=sequential")


@torch.no_grad()
def block_statistics(model: nn.Module, segments: torch.Tensor, device: torch.device | str
                     ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, str]]]:
    """One forward of ``segments`` [b, seqlen] through the dense model: ({"<layer>.<group leader>": [b, width] Σx²
    per segment}, {layer: {module: its group leader}}); modules fed the very same tensor share the leader's."""
    adapter = Adapter(model)
    stats: dict[str, torch.Tensor] = {}
    groups = [InputGroups() for _ in adapter.layers]
    batch = segments.shape[0]

    def recorder(index: int):
        def record(name: str, x: torch.Tensor) -> None:
            if groups[index].leads(name, x):
                flat = x.reshape(batch, -1, x.shape[-1]).float()
                stats[f"{index}.{name}"] = torch.linalg.vecdot(flat, flat, dim=1).cpu()

        return record

    model.to(device)
    with ExitStack() as stack:
        for i, layer in enumerate(adapter.layers):
            stack.enter_context(adapter.observe(layer, recorder(i)))
        model.base_model(input_ids=segments.to(device), use_cache=False)
    return stats, {str(i): g.leader for i, g in enumerate(groups)}


@dataclass
class LanguageStatistics:
    """The dense model's per-segment statistics of each language's calibration sample, addressable by language,
    layer and input group; blocks come from ``store`` when it holds them (None: computed in memory only)."""

    model: nn.Module
    source: SegmentSource
    weights: str  # weights fingerprint of the dense model (mbs/evaluate/baseline.py)
    store: Cache | None = None
    device: str = "cpu"
    force: bool = False
    pool: int = 0  # segments per language at most (0: every segment the mixture has, exactly)
    computed: int = 0  # blocks forwarded by this object
    loaded: int = 0  # blocks found in the store
    _leaders: dict[str, dict[str, str]] = field(default_factory=dict)
    _keys: dict[str, str] = field(default_factory=dict)  # language -> digest of what its sample depends on
    _memo: dict[tuple[str, int], dict[str, torch.Tensor]] = field(default_factory=dict)  # blocks read or computed

    def _block(self, language: str, block: int) -> dict[str, torch.Tensor]:
        """A block, read or computed once per object (mixtures built again and again, by the mixture optimiser,
        neither re-read the store nor forward again)."""
        if (language, block) not in self._memo:
            self._memo[language, block] = self._load_block(language, block)
        return self._memo[language, block]

    def _name(self, language: str, block: int) -> str:
        if language not in self._keys:  # the sample's key reads the corpus files' digests: once per language
            key = json.dumps({"v": VERSION, "block": BLOCK, "weights": self.weights, "device": self.device,
                              "sample": self.source.key(language), "environment": numeric_environment()},
                             sort_keys=True, default=str)
            self._keys[language] = hashlib.sha256(key.encode()).hexdigest()[:24]
        return f"statistics/{self._keys[language]}/{language}-{block}"

    def _load_block(self, language: str, block: int) -> dict[str, torch.Tensor]:
        def compute() -> tuple[dict[str, torch.Tensor], dict]:
            segments = self.source.segments(language, (block + 1) * BLOCK)[block * BLOCK:]
            self.computed += 1
            return block_statistics(self.model, segments, self.device)

        if self.store is None:
            stats, leaders = compute()
            self._leaders = self._leaders or leaders
            return stats
        before = self.computed

        def build(directory) -> None:
            stats, leaders = compute()
            save_file(stats, str(directory / "statistics.safetensors"))
            (directory / "leaders.json").write_text(json.dumps(leaders))

        path = self.store.entry(self._name(language, block), build, f"statistics of {language} block {block}",
                                rebuild=self.force)
        self.loaded += self.computed == before
        self._leaders = self._leaders or json.loads((path / "leaders.json").read_text())
        return load_file(str(path / "statistics.safetensors"))

    @property
    def leaders(self) -> dict[str, dict[str, str]]:
        """{layer: {module: its group leader}}, known once any block was read or computed."""
        return self._leaders

    def segments(self, language: str, count: int) -> dict[str, torch.Tensor]:
        """{"<layer>.<group leader>": [count, width]} of the language's first ``count`` segments."""
        blocks = [self._block(language, b) for b in range(math.ceil(count / BLOCK))]
        return {k: torch.cat([b[k] for b in blocks])[:count] for k in blocks[0]}

    def mixture(self, counts: dict[str, int]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, str]]]:
        """Σx² of the mixture's segments per layer and group (summed in fp64, languages in sorted order), and the
        groups: exactly what the non-sequential statistics of that calibration set are, whatever is cached. With a
        ``pool``, a language's count above it is covered by its first ``pool`` segments, scaled by count / pool."""
        total: dict[str, torch.Tensor] = {}
        for language in sorted(k for k, v in counts.items() if v):
            used = min(counts[language], self.pool) if self.pool else counts[language]
            for key, per_segment in self.segments(language, used).items():
                part = per_segment.double().sum(0)
                if used != counts[language]:
                    part = part * (counts[language] / used)
                total[key] = total[key] + part if key in total else part
        return {k: v.float() for k, v in total.items()}, self._leaders


def check_sample(calibration: CalibrationSet, source: SegmentSource) -> None:
    """The job's calibration set is the prefix of each language's sample the cache extends (else the statistics
    would describe other text)."""
    for language, segments in calibration.segments.items():
        if segments.shape[0] and not torch.equal(source.segments(language, segments.shape[0]), segments):
            raise RuntimeError(f"the calibration segments of {language!r} are not the prefix of its seeded sample; "
                               f"cannot use engine.mode=cached")


def plan_from_sums(adapter: Adapter, compressor: Compressor, mixed: dict[str, torch.Tensor],
                   leaders: dict[str, dict[str, str]], full: dict[int, str]) -> dict:
    """A layer sparsity profile planned from the mixture's dense Σx² (``compressor.plan``), no forward."""
    figures, modules = [], []
    for i, layer in enumerate(adapter.layers):
        linears = adapter.linears(layer)
        norms = {name: mixed[f"{i}.{group}"].sqrt() for name, group in leaders[str(i)].items()}
        figures.append(layer_profile_figure(compressor, linears, norms))
        modules.append({f"{full[id(layer)]}.{name}": m.weight.numel() for name, m in linears.items()})
    return compressor.plan(figures, modules)


def compress_layer_from_sums(adapter: Adapter, index: int, layer_name: str, linears: dict, compressor: Compressor,
                             mixed: dict[str, torch.Tensor], leaders: dict[str, dict[str, str]], tokens: int):
    """Compress layer ``index`` in place from the mixture's Σx² (``leaders``: {} for a compressor that needs no
    statistics); the :class:`mbs.compress.step.LayerStep`."""
    leader = leaders[str(index)] if leaders else {}
    totals: dict[str, Statistic] = {}
    for group in dict.fromkeys(leader.values()):  # the mixture's sum handed to the compressor's own statistic
        totals[group] = compressor.new_statistic(linears[group])
        totals[group].merge(ColumnSquares.from_sum(mixed[f"{index}.{group}"], tokens))
    return compress_layer(adapter, layer_name, linears, compressor, totals, leader)


@torch.no_grad()
def compress_cached(model: nn.Module, compressor: Compressor, calibration: CalibrationSet,
                    statistics: LanguageStatistics, offload_device: str = "cpu",
                    progress: bool = True) -> CompressionReport:
    """Compress every decoder layer from the mixture's non-sequential statistics (no forward once cached)."""
    adapter = Adapter(model)
    check_modules(model, compressor)
    report = CompressionReport()
    start = time.perf_counter()
    counts = {k: int(v.shape[0]) for k, v in calibration.segments.items()}
    mixed, leaders = {}, {}
    if (compressor.needs_statistics or compressor.needs_profile) and not compressor.is_noop:
        check_sample(calibration, statistics.source)
        mixed, leaders = statistics.mixture(counts)
    tokens = sum(counts.values()) * statistics.source.seqlen
    full = module_names(model)
    if compressor.needs_profile:  # the statistics are the dense model's already: no pre-pass
        report.profile = plan_from_sums(adapter, compressor, mixed, leaders, full)
    if not compressor.needs_statistics:
        leaders = {}
    layers: Iterable = enumerate(adapter.layers)
    if progress:
        from tqdm import tqdm

        layers = tqdm(layers, total=len(adapter.layers), desc=f"compress cached ({type(compressor).__name__})",
                      leave=False)
    for i, layer in layers:
        t0 = time.perf_counter()
        linears = adapter.linears(layer)
        step = compress_layer_from_sums(adapter, i, full[id(layer)], linears, compressor, mixed, leaders, tokens)
        report.uncalibrated += step.uncalibrated
        layer.to(offload_device)
        report.layers.append(layer_record(i, time.perf_counter() - t0, step.modules, step.shared_inputs))
    report.seconds = time.perf_counter() - start
    report.statistics_blocks = {"loaded": statistics.loaded, "computed": statistics.computed}
    log.info("cached statistics: %d blocks of %d segments loaded, %d computed", statistics.loaded, BLOCK,
             statistics.computed)
    return report


@register_pipeline("cached", check=check_cached)
def cached(model: nn.Module, compressor: Compressor, calibration: CalibrationSet, config: EngineConfig,
           context: PipelineContext) -> CompressionReport:
    """``engine.mode=cached``: the dense model's statistics of ``context.source``'s segments (kept in
    ``context.store``, keyed by ``context.weights``), mixed as ``calibration`` counts them."""
    if context.source is None:
        raise ValueError("engine.mode=cached needs the languages' segment source (PipelineContext.source)")
    statistics = LanguageStatistics(model, context.source, context.weights, context.store, config.device,
                                    force=context.force, pool=config.statistics_pool)
    return compress_cached(model, compressor, calibration, statistics, config.offload_device, context.progress)
