"""Writing the compressed model in the format the serving ecosystem reads: the one module that knows the formats.

``compressed-tensors`` (default): every quantized Linear is written by the ``compressed-tensors`` library's own
``pack-quantized`` compressor (int weights packed in int32, ``weight_scale`` in the model dtype, ``weight_zero_point``
when asymmetric, ``weight_shape``) and ``config.json`` gets the ``quantization_config`` that transformers (with the
``compressed-tensors`` package) and vLLM read. Our grid is that format's grid: q ∈ [0, 2^b−1] with zero point z is
its signed q−2^(b−1) with zero point z−2^(b−1); a symmetric grid has z = 2^(b−1), i.e. its zero point 0 (not stored);
scales are fitted in the model dtype (mbs/compress/grid.py). Every module is decompressed again before writing
and must give back the in-memory weight bit for bit, so the reloaded model computes what was evaluated.

An asymmetric grid's zero points are written as the library's compressor writes them and vLLM's WNA16 scheme reads
them: packed along the output rows into int32, shape (out·bits/32, groups). transformers' plain ``from_pretrained``
cannot take them in compressed form: it builds the compressed module layout on the meta device through the same
compressor (``PackedQuantizationCompressor.compress``, compressed-tensors 0.20.1), whose meta branch leaves
``weight_zero_point`` unpacked, int8 (out, groups), so the load stops on a size mismatch. The checkpoint therefore
asks transformers to decompress at load time (``"dequantize": true`` in its ``quantization_config``, a
``CompressedTensorsConfig`` loading attribute; compressed-tensors' ``QuantizationConfig`` ignores unknown keys and
vLLM's ``CompressedTensorsConfig.from_config`` reads only the keys it names): the plain call then gives the dense
model in the model dtype, the very weights that were evaluated. Symmetric checkpoints store no zero point and
load compressed, decompressed on the first forward.

What stays dense: embeddings and the LM head (never compressed), norms, biases, and pruned weights. compressed-tensors
0.20 no longer writes or reloads any sparse format (its model compressor writes ``sparsity_config: {}``; the bitmask
formats are legacy), so a pruned-only model is written as a dense checkpoint whose pruned weights are zeros.

``dense``: the model as it is in memory (pruned weights zero, quantized weights fake-quantized in the model dtype).

A streamed model (engine.stream=true) is written layer by layer, each read back for its turn, with the same tensors
and config as ``save_pretrained`` gives the in-memory model; only the sharding differs (one shard per decoder layer).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mbs.models.streaming import is_streamed, layer_store

log = logging.getLogger(__name__)

FORMATS = ("compressed-tensors", "dense")
SERVED_BITS = (4, 8)  # vLLM's compressed-tensors weight-only kernels (WNA16); transformers reloads 2-8 bits


def quantizes(compressor: Any) -> bool:
    """True when the compressor leaves weights on a quantization grid it keeps records of (RTN, GPTQ, SparseGPT+bits)."""
    spec = getattr(compressor, "spec", None)
    return hasattr(compressor, "records") and spec is not None and spec.enabled


def check_format(save_format: str) -> None:
    if save_format not in FORMATS:
        raise ValueError(f"save_format={save_format!r} is not a known format; allowed: {', '.join(FORMATS)}")


def check_export(save_format: str, compressor: Any, modules: dict[str, nn.Module] | None = None) -> None:
    """Raise (one line, before the model loads) when ``save_format`` is unknown or cannot describe the compressor's
    result; ``modules``: the modules the compressor will see, by full name (shapes only: a meta skeleton will do)."""
    check_format(save_format)
    if save_format != "compressed-tensors" or not quantizes(compressor):
        return
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as err:
        raise ValueError("save_format=compressed-tensors needs the compressed-tensors package: "
                         "pip install compressed-tensors (or set save_format=dense)") from err
    if getattr(compressor, "actorder", False) and not getattr(compressor, "static_groups", False) \
            and compressor.groupsize > 0:
        raise ValueError("compressor.actorder=true with compressor.static_groups=false makes groups of permuted "
                         "columns (a g_idx), which compressed-tensors no longer stores (its actorder='group' was "
                         "removed); set compressor.static_groups=true (its actorder='weight') or save_format=dense")
    for name, module in (modules or {}).items():
        if type(module) is not nn.Linear:
            raise ValueError(f"{name}: compressed-tensors packs nn.Linear weights, not {type(module).__name__}; "
                             f"set save_format=dense")
    if compressor.bits not in SERVED_BITS:
        log.warning("compressor.bits=%d: the compressed-tensors checkpoint reloads with transformers, but vLLM's "
                    "kernels serve only %s-bit weights", compressor.bits, "/".join(map(str, SERVED_BITS)))


def _scheme(compressor: Any):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    groupsize = compressor.groupsize
    args = QuantizationArgs(num_bits=compressor.bits, type="int", symmetric=compressor.sym,
                            strategy="group" if groupsize > 0 else "channel",
                            group_size=groupsize if groupsize > 0 else None,
                            actorder="weight" if getattr(compressor, "actorder", False) else None)
    return QuantizationScheme(targets=["Linear"], weights=args)


def _compressed_state(name: str, module: nn.Linear, grids: dict[str, Any], scheme, compressor_cls) -> dict:
    """The module's tensors as compressed-tensors writes them, checked to decompress to the in-memory weight."""
    weight = module.weight.detach()
    offset = 2 ** (grids["bits"] - 1)
    # fp32 weights in: the library divides by the scale in the weight's dtype, and a bf16 quotient can land half a
    # step off an 8-bit level; the stored scale stays in the model dtype
    local = {"weight": weight.float(), "weight_scale": grids["scale"].to(weight.dtype)}
    if not grids["sym"]:
        local["weight_zero_point"] = (grids["zero"] - offset).to(torch.int8)
    scale = grids["scale"]
    if not torch.equal(scale.to(weight.dtype).float(), scale):
        raise RuntimeError(f"{name}: scales are not representable in {weight.dtype}; cannot export exactly")
    expected_width = grids["groupsize"] if grids["groupsize"] > 0 else weight.shape[1]
    if not torch.equal(grids["g_idx"].cpu(), torch.arange(weight.shape[1]) // expected_width):
        raise RuntimeError(f"{name}: columns are grouped by a permutation (g_idx), which compressed-tensors cannot store")
    packed = compressor_cls.compress(local, scheme)
    back = compressor_cls.decompress(dict(packed), scheme)["weight"]
    if not torch.equal(back.to(weight.dtype), weight):
        diff = int((back.to(weight.dtype) != weight).sum())
        raise RuntimeError(f"{name}: {diff} weights do not decompress to their in-memory values; not exporting")
    return {k: v for k, v in packed.items() if k != "weight"}


def _unique_bytes(tensors) -> int:
    """Bytes of the tensors in their dtype, a tied tensor counted once (as a checkpoint stores it)."""
    seen, total = set(), 0
    for t in tensors:
        key = id(t) if t.is_meta else (t.data_ptr(), t.numel())  # a streamed model's layers are meta tensors
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def directory_bytes(directory: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob(pattern) if p.is_file())


def export(model: nn.Module, directory: str | Path, compressor: Any = None, tokenizer: Any = None,
           save_format: str = "compressed-tensors") -> dict[str, Any]:
    """Write ``model`` (compressed in memory by ``compressor``) to ``directory``; return what was written and its
    bytes on disk beside the dense size (``results["export"]``). The in-memory model is not modified."""
    check_export(save_format, compressor)
    directory = Path(directory)
    with replacing_directory(directory) as tmp:
        info = _write(model, tmp, compressor, tokenizer, save_format)
    info["directory"] = str(directory)
    log.info("exported %s (%d quantized modules) to %s: %.1f MB of weights, dense %.1f MB", info["format"],
             info["quantized_modules"], directory, info["weights_bytes"] / 1e6, info["dense_bytes"] / 1e6)
    return info


@contextmanager
def replacing_directory(directory: Path) -> Iterator[Path]:
    """A temporary sibling to write; on success it takes the place of ``directory`` (an older one is removed only
    then), on failure it is removed and ``directory`` is left as it was."""
    clean_orphans(directory)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    old = directory.with_name(f".{directory.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not directory.exists():
            os.replace(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: a process of another user has that pid
        return True
    return True


def clean_orphans(directory: Path) -> list[Path]:
    """Remove what a killed :func:`replacing_directory` left beside ``directory``: ``.<name>.tmp<pid>`` (a half- or
    fully-written replacement) and ``.<name>.old<pid>`` (the previous directory, renamed away just before the
    replacement took its place), for pids that are no longer running on this machine; a live writer's are left alone.
    When ``directory`` itself is missing (killed between the two renames), the previous one is put back, so the
    directory matches the results.json beside it. Returns what was removed."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(directory.name)}\.(tmp|old)(\d+)$")
    found = [(m.group(1), int(m.group(2)), p) for p in (directory.parent.iterdir() if directory.parent.is_dir() else [])
             if (m := pattern.match(p.name))]
    for kind, pid, path in sorted(found, key=lambda f: f[0] != "old"):  # restore an old one before removing temps
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if kind == "old" and not directory.exists():
            os.replace(path, directory)
            log.warning("%s was missing after an interrupted export (process %d); the previous one is back", directory,
                        pid)
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
        log.info("removed %s, left by an interrupted export (process %d)", path, pid)
    return removed


def _write(model: nn.Module, directory: Path, compressor: Any, tokenizer: Any, save_format: str) -> dict[str, Any]:
    records = getattr(compressor, "records", {}) if save_format == "compressed-tensors" and quantizes(compressor) else {}
    quantization_config = None
    convert = None
    if records:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.compressors.format import infer_module_format
        from compressed_tensors.quantization import QuantizationConfig

        scheme = _scheme(compressor)
        fmt = infer_module_format(nn.Linear, scheme)
        compressor_cls = BaseCompressor.get_value_from_registry(fmt.value)
        modules = dict(model.named_modules())
        missing = [n for n in records if n not in modules]
        if missing:
            raise RuntimeError(f"compressor records name modules the model does not have: {', '.join(missing[:3])}")

        def packed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            """The quantized modules' weights in ``state`` (keyed by full names) replaced by their packed tensors."""
            for name in [n for n in records if f"{n}.weight" in state]:
                del state[f"{name}.weight"]
                grids = records[name].copy()  # a streamed run's offloaded record: its file read once
                for key, value in _compressed_state(name, modules[name], grids, scheme, compressor_cls).items():
                    state[f"{name}.{key}"] = value
            return state

        convert = packed
        ignore = sorted(n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in records)
        quantization_config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt.value,
                                                 quantization_status="compressed", ignore=ignore)
    if is_streamed(model):
        _save_streamed(model, directory, convert or (lambda state: state))
    else:
        state = dict(model.state_dict())
        model.save_pretrained(directory, state_dict=convert(state) if convert else state, safe_serialization=True)
    if quantization_config is not None:
        from compressed_tensors.compressors import ModelCompressor

        ModelCompressor(quantization_config=quantization_config).update_config(str(directory))
        if not compressor.sym:
            _dequantize_on_load(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    embeddings = [m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    dense = _unique_bytes(model.parameters())
    embedding = _unique_bytes(embeddings)
    weights = directory_bytes(directory, "*.safetensors")
    return {
        "format": "compressed-tensors/" + quantization_config.format if records else "dense",
        "quantized_modules": len(records),
        "bits": compressor.bits if records else None,
        "kept_dense": ("embeddings, LM head, norms, biases" + ("" if records else ", every Linear weight (pruned "
                       "weights as zeros: compressed-tensors writes no sparse format)")),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "bytes_on_disk": directory_bytes(directory),
        "weights_bytes": weights,
        "dense_bytes": dense,
        "embedding_bytes": embedding,
        "weights_to_dense": weights / dense if dense else None,
        "non_embedding_to_dense": (weights - embedding) / (dense - embedding) if dense > embedding else None,
    }


def _save_streamed(model: nn.Module, directory: Path, convert) -> None:
    """``save_pretrained`` for a streamed model (engine.stream=true), whose decoder layers are in memory only for
    their turn: one shard for the embeddings, final norm and head, then one per decoder layer, each read back from the
    offload folder (or the checkpoint, if unchanged), converted by ``convert`` and freed before the next; an index
    and the config as ``save_pretrained`` writes them. Tied weights are stored once, under their first name."""
    from safetensors.torch import save_file

    from mbs.models.adapter import Adapter

    store, layers = layer_store(model), Adapter(model).layers
    directory.mkdir(parents=True, exist_ok=True)
    total = len(layers) + 1
    weight_map: dict[str, str] = {}
    size = 0

    def save(state: dict[str, torch.Tensor], shard: int) -> None:
        nonlocal size
        name = f"model-{shard:05d}-of-{total:05d}.safetensors"
        state = {k: v.detach().to("cpu").contiguous() for k, v in convert(state).items()}
        save_file(state, str(directory / name), metadata={"format": "pt"})
        weight_map.update((key, name) for key in state)
        size += sum(v.numel() * v.element_size() for v in state.values())

    inside = tuple(f"{prefix}." for prefix in store.prefix)
    outer, seen = {}, set()
    for key, value in model.state_dict(keep_vars=True).items():
        if not key.startswith(inside) and id(value) not in seen:
            seen.add(id(value))
            outer[key] = value
    save(outer, 1)
    for index, layer in enumerate(layers):
        store.fetch(index, layer, "cpu")
        try:
            save({f"{store.prefix[index]}.{k}": v for k, v in layer.state_dict().items()}, index + 2)
        finally:
            store.release(index, layer, "cpu", changed=False)
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    model.config.dtype = next(model.parameters()).dtype
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)


def _dequantize_on_load(directory: Path) -> None:
    """Mark the checkpoint's quantization_config to be decompressed when transformers loads it, so the plain
    ``from_pretrained(directory)`` opens an asymmetric checkpoint (see the module docstring for why it cannot load it
    compressed); a ``quantization_config`` passed to ``from_pretrained`` still overrides it."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["dequantize"] = True
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_exported(directory: str | Path, dtype: torch.dtype | str = "auto") -> nn.Module:
    """Reload an exported checkpoint with transformers, quantized weights decompressed at load time (what works for
    symmetric and asymmetric grids alike, and for checkpoints written before the plain call could open them; vLLM
    reads the same directory as it is)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    quantization = json.loads((Path(directory) / "config.json").read_text()).get("quantization_config")
    if quantization is not None and not quantization.get("dequantize", False):
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs).eval().requires_grad_(False)
