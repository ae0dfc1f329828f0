"""MBS, the Multilingual Brain Surgeon: calibrate on a mixture of languages in proportion to the model's training
data, compress layer by layer, measure every language.

    import mbs
    result = mbs.run("model=bloom-560m", "compressor=gptq", output_dir="out")  # as `mbs run model=... compressor=...`

    calibration = mbs.calibration_mixture(tokenizer, mbs.UDHRCorpus(), distribution, seqlen=256)
    report = mbs.compress_model(model, mbs.Wanda(sparsity=0.5), calibration)
    losses = mbs.perplexity(model, mbs.evaluation_windows(tokenizer, mbs.UDHRCorpus(), ["en", "sw"], seqlen=256))

Names load on first use, so ``import mbs`` stays light (no torch or transformers until a call needs them).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # the calls (mbs/api.py; mbs/pipeline.py runs the same ones)
    "run": "mbs.launch", "compose": "mbs.api", "configure": "mbs.api", "load": "mbs.api", "calibration_mixture": "mbs.api",
    "evaluation_windows": "mbs.api", "compress_model": "mbs.api", "perplexity": "mbs.api", "export": "mbs.api",
    "window_bytes": "mbs.api",
    "load_exported": "mbs.record.export",
    # compressors (their fields are the conf/compressor options)
    "Wanda": "mbs.compress.pruning", "Magnitude": "mbs.compress.pruning", "Dense": "mbs.compress.pruning",
    "SparseGPT": "mbs.compress.sparsegpt", "GPTQ": "mbs.compress.quantization", "RTN": "mbs.compress.quantization",
    "AWQ": "mbs.compress.awq",
    "EngineConfig": "mbs.compress.engine",
    # corpora and samplers
    "UDHRCorpus": "mbs.data.corpora", "HubCorpus": "mbs.data.hub", "LocalCorpus": "mbs.data.local",
    "ProportionalSampler": "mbs.data.sampling", "TemperatureSampler": "mbs.data.sampling",
    "UniformSampler": "mbs.data.sampling", "CountsSampler": "mbs.data.sampling",
    "MonolingualSampler": "mbs.data.sampling", "CalibrationSet": "mbs.data.calibration",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mbs' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
