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


def _kind(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if isinstance(value, (str, int, float)) else type(value).__name__


def _check_type(value: Any, kind: type | tuple[type, ...], argument: str, allowed: str) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{argument} must be {allowed}, not {_kind(value)}")


def check_model(model: Any, argument: str = "model", streamed_ok: bool = False) -> int:
    """A torch module with its weights in memory (not on the meta device; with ``streamed_ok`` also a streamed model,
    engine.stream=true, whose layers are read from disk for their turn); returns its vocabulary size (0: none)."""
    from mbs.models.streaming import is_streamed

    _check_type(model, nn.Module, argument, "a torch.nn.Module (e.g. the model of mbs.load or from_pretrained)")
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None and not (streamed_ok and is_streamed(model)):
        raise ValueError(f"{argument} has weights on the meta device (no data, e.g. {meta}): load its weights "
                         f"first (from_pretrained, or to_empty() and load_state_dict)")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(getattr(embeddings, "num_embeddings", 0) or 0)


def check_token_ids(ids: torch.Tensor, vocab: int, argument: str) -> None:
    """Integer token ids in [0, vocab): float or out-of-vocabulary ids name the argument instead of failing inside
    the embedding."""
    _check_type(ids, torch.Tensor, argument, "a tensor of token ids")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{argument} holds {ids.dtype} values: token ids must be integers (torch.long)")
    if ids.numel() and vocab and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{argument} holds token ids outside the model's vocabulary [0, {vocab}): "
                         f"min {int(ids.min())}, max {int(ids.max())} (a tokenizer of another model?)")


def load(spec) -> tuple[Any, nn.Module]:
    """(tokenizer, model) of a model config (:class:`mbs.models.spec.ModelSpec` or a ``conf/model`` option name)."""
    from mbs.models.loading import load_model, load_tokenizer
    from mbs.models.spec import ModelSpec

    _check_type(spec, (str, ModelSpec), "spec", "a conf/model option name (e.g. 'tiny-llama') or a ModelSpec")
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
    _check_inputs(tokenizer, corpus)
    _check_type(distribution, Mapping, "distribution", "a mapping of language code to training share, e.g. "
                "{'en': 0.3, 'sw': 0.01}")
    for code, share in distribution.items():
        if not isinstance(share, (int, float)) or isinstance(share, bool):
            raise TypeError(f"distribution[{code!r}] must be a number (a training share), not {_kind(share)}")
    _check_type(sampler, (Sampler, type(None)), "sampler", "an mbs sampler (e.g. mbs.UniformSampler()) or None")
    if sampler is None:
        have = set(corpus.languages())
        sampler = ProportionalSampler(languages=[k for k in distribution if k in have and distribution[k] > 0])
    counts = sampler.counts(distribution)
    return build_calibration(tokenizer, corpus, counts, seqlen, seed, prepend_bos, cache=cache)


def evaluation_windows(tokenizer, corpus: Corpus, languages: list[str], *, seqlen: int = 2048,
                       prepend_bos: bool = False, max_windows: int | None = None,
                       cache: TokenCache | None = None) -> dict[str, list[torch.Tensor]]:
    """Non-overlapping windows of each language's evaluation split (every token scored once)."""
    _check_inputs(tokenizer, corpus)
    if isinstance(languages, str) or not isinstance(languages, Sequence):
        raise TypeError(f"languages must be a list of language codes, e.g. ['en', 'sw'], not {_kind(languages)}")
    return build_eval_windows(tokenizer, corpus, languages, seqlen, prepend_bos, max_windows=max_windows, cache=cache)


def _check_inputs(tokenizer: Any, corpus: Any) -> None:
    if tokenizer is None or not callable(tokenizer):
        raise TypeError(f"tokenizer must be a tokenizer (e.g. the first value of mbs.load), not {_kind(tokenizer)}")
    _check_type(corpus, Corpus, "corpus", "a corpus, e.g. mbs.UDHRCorpus(), mbs.LocalCorpus(path=...), "
                "mbs.HubCorpus(...)")


def compress_model(model: nn.Module, compressor: Compressor, calibration: CalibrationSet,
                   config: EngineConfig | None = None, observer: StatisticsObserver | None = None,
                   progress: bool = False) -> CompressionReport:
    """Compress ``model`` in place, layer by layer, with ``compressor`` (e.g. ``mbs.Wanda(sparsity=0.5)``,
    ``mbs.GPTQ(bits=4, groupsize=128)``) calibrated on ``calibration``; returns per-layer figures."""
    vocab = check_model(model)
    _check_type(compressor, Compressor, "compressor", "an mbs compressor, e.g. mbs.Wanda(sparsity=0.5), "
                "mbs.SparseGPT(), mbs.GPTQ(bits=4), mbs.RTN(), mbs.Magnitude()")
    _check_type(calibration, CalibrationSet, "calibration", "a CalibrationSet (from mbs.calibration_mixture)")
    for code, ids in calibration.segments.items():
        check_token_ids(ids, vocab, f"calibration.segments[{code!r}]")
    _check_type(config, (EngineConfig, type(None)), "config", "an mbs.EngineConfig or None")
    return engine.compress_model(model, compressor, calibration, config or EngineConfig(), observer=observer,
                                 progress=progress)


def perplexity(model: nn.Module, windows: dict[str, list[torch.Tensor]], *, device: str = "cpu", batch_size: int = 8,
               chunk_tokens: int = 256, progress: bool = False,
               window_bytes: Mapping[str, Sequence[int]] | None = None, dtype: str = "float32-head"
               ) -> dict[str, LanguageLoss]:
    """Per-language loss (``.perplexity``, ``.nll``, ``.tokens``) over ``windows`` (:func:`evaluation_windows`);
    with ``window_bytes=mbs.window_bytes(tokenizer, windows, prepend_bos)`` also ``.bytes`` and ``.bpb`` (bits per
    byte). ``dtype``: the evaluation's precision, as ``eval.dtype`` (float32-head, model or float32)."""
    vocab = check_model(model)
    _check_type(windows, Mapping, "windows", "a mapping of language code to a list of token-id tensors (from "
                "mbs.evaluation_windows)")
    for code, tensors in windows.items():
        if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
            raise TypeError(f"windows[{code!r}] must be a list of token-id tensors, not {_kind(tensors)}")
        for i, ids in enumerate(tensors):
            check_token_ids(ids, vocab, f"windows[{code!r}][{i}]")
    return evaluate_languages(model, windows, device, batch_size, chunk_tokens, progress=progress,
                              window_bytes=window_bytes, dtype=dtype)


def export(model: nn.Module, directory: str | Path, compressor: Compressor | None = None, tokenizer: Any = None,
           save_format: str = "compressed-tensors") -> dict[str, Any]:
    """Write the compressed model for transformers/vLLM (see mbs/record/export.py); returns formats and sizes."""
    from mbs.paths import check_creatable
    from mbs.record.export import export as write

    check_model(model, streamed_ok=True)
    _check_type(directory, (str, Path), "directory", "a path (str or pathlib.Path)")
    _check_type(compressor, (Compressor, type(None)), "compressor", "the mbs compressor the model was compressed "
                "with, or None")
    check_creatable(directory, "directory")

    return write(model, directory, compressor, tokenizer, save_format)

