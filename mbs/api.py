"""The calls a researcher scripts with, and the stages ``mbs.pipeline`` runs: the same functions, so a script and
``python run.py`` compute the same thing. Everything is re-exported lazily by ``import mbs``."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mbs.compress.base import Compressor
from mbs.config import CONFIG_SEARCH_PATH, build, register
from mbs.compress import engine
from mbs.compress.engine import CompressionReport, EngineConfig, StatisticsObserver
from mbs.data.cache import TokenCache
from mbs.data.calibration import CalibrationSet, build_calibration, build_eval_windows
from mbs.data.calibration import window_bytes  # noqa: F401 - mbs.window_bytes, for perplexity(window_bytes=)
from mbs.data.corpora import Corpus
from mbs.data.sampling import ProportionalSampler, Sampler
from mbs.evaluate.perplexity import LanguageLoss, evaluate_languages


def compose(*overrides: str, return_hydra_config: bool = False):
    """The run config exactly as ``mbs run <overrides>`` (or ``python run.py``) composes it, unchecked; with
    ``return_hydra_config=True`` also its ``hydra`` node (run directory, chosen options)."""
    from hydra import compose as hydra_compose, initialize_config_module

    register()
    with initialize_config_module(config_module=CONFIG_SEARCH_PATH.removeprefix("pkg://"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def configure(*overrides: str):
    """The checked objects of a run config (:class:`mbs.config.Run`: model spec, corpus, sampler, compressor, ...),
    e.g. ``configure("model=bloom-560m", "compressor=gptq").model.distribution``."""
    return build(compose(*overrides))


def load(spec) -> tuple[Any, nn.Module]:
    """(tokenizer, model) of a model config (:class:`mbs.models.spec.ModelSpec` or a ``conf/model`` option name)."""
    from mbs.models.loading import load_model, load_tokenizer

    if isinstance(spec, str):
        spec = configure(f"model={spec}").model
    return load_tokenizer(spec), load_model(spec)


def calibration_mixture(tokenizer, corpus: Corpus, distribution: Mapping[str, float], sampler: Sampler | None = None,
                        *, seqlen: int = 2048, seed: int = 0, prepend_bos: bool = False,
                        cache: TokenCache | None = None) -> CalibrationSet:
    """The MBS calibration set: segments of ``seqlen`` tokens per language, as many as ``sampler`` allots from the
    model's training-language ``distribution`` (default: the MBS sampler, 128 segments proportional to the
    distribution over every language it names that ``corpus`` has). ``.to_dataset()`` gives a ``datasets.Dataset``
    of ``input_ids``/``attention_mask`` for other toolkits (e.g. llm-compressor's ``oneshot(dataset=...)``)."""
    if sampler is None:
        have = set(corpus.languages())
        sampler = ProportionalSampler(languages=[k for k in distribution if k in have and distribution[k] > 0])
    counts = sampler.counts(distribution)
    return build_calibration(tokenizer, corpus, counts, seqlen, seed, prepend_bos, cache=cache)


def evaluation_windows(tokenizer, corpus: Corpus, languages: list[str], *, seqlen: int = 2048,
                       prepend_bos: bool = False, max_windows: int | None = None,
                       cache: TokenCache | None = None) -> dict[str, list[torch.Tensor]]:
    """Non-overlapping windows of each language's evaluation split (every token scored once)."""
    return build_eval_windows(tokenizer, corpus, languages, seqlen, prepend_bos, max_windows=max_windows, cache=cache)


def compress_model(model: nn.Module, compressor: Compressor, calibration: CalibrationSet,
                   config: EngineConfig | None = None, observer: StatisticsObserver | None = None,
                   progress: bool = False) -> CompressionReport:
    """Compress ``model`` in place, layer by layer, with ``compressor`` (e.g. ``mbs.Wanda(sparsity=0.5)``,
    ``mbs.GPTQ(bits=4, groupsize=128)``) calibrated on ``calibration``; returns per-layer figures."""
    return engine.compress_model(model, compressor, calibration, config or EngineConfig(), observer=observer,
                                 progress=progress)


def perplexity(model: nn.Module, windows: dict[str, list[torch.Tensor]], *, device: str = "cpu", batch_size: int = 8,
               chunk_tokens: int = 256, progress: bool = False,
               window_bytes: Mapping[str, Sequence[int]] | None = None) -> dict[str, LanguageLoss]:
    """Per-language loss (``.perplexity``, ``.nll``, ``.tokens``) over ``windows`` (:func:`evaluation_windows`);
    with ``window_bytes=mbs.window_bytes(tokenizer, windows, prepend_bos)`` also ``.bytes`` and ``.bpb`` (bits per
    byte)."""
    return evaluate_languages(model, windows, device, batch_size, chunk_tokens, progress=progress,
                              window_bytes=window_bytes)


def export(model: nn.Module, directory: str | Path, compressor: Compressor | None = None, tokenizer: Any = None,
           save_format: str = "compressed-tensors") -> dict[str, Any]:
    """Write the compressed model for transformers/vLLM (see mbs/record/export.py); returns formats and sizes."""
    from mbs.record.export import export as write

    return write(model, directory, compressor, tokenizer, save_format)

