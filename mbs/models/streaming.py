"""Models larger than memory (``engine.stream=true``): where a decoder layer waits between its turns.

In memory (the default, :class:`InMemoryLayers`) a layer moves to the compute device for its turn and back. Streamed
(:class:`StreamedLayers`) the model is a skeleton whose layers hold no weights (the meta device): a layer is read
from the safetensors files the model loads from (memory-mapped, one tensor at a time) for its turn only, and freed
after it (weights that transformers renames or converts on load, e.g. per-expert MoE weights it fuses, go through
transformers' own loading conversion, one layer at a time); once compressed it is written to an offload folder (one
safetensors file per layer, renamed into place in one step, its digest checked when read back) and read from there
from then on. Embeddings, final norm and head stay
in memory. The engine (mbs/compress/engine.py) and the evaluation (mbs/evaluate/streamed.py) run the same loop either
way: they ask :func:`layer_store` for the model's store and call ``fetch`` and ``release`` around each layer's turn.

Safety of the offload folder: it belongs to one run (``<run dir>/offload``); a run starts by removing every layer file
and temporary it finds there (left by a killed run: never trusted, never read), a layer file appears under its name
only once complete, and a file is read back only if its size and xxh3 digest are the ones this process wrote.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mbs.atomic import atomic_path
from mbs.cache import file_digest

log = logging.getLogger(__name__)

META = torch.device("meta")
STORE_ATTR = "_mbs_layer_store"  # set on a streamed model by attach()
LAYER_FILE = "layer-{:05d}.safetensors"
RECORDS_FILE = "records-{:05d}.safetensors"  # a compressor's per-module records of one layer (GPTQ's grids)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules whose parameters are on the meta device (no memory, no initialisation cost) while buffers stay
    real: non-persistent buffers (rotary tables) are computed by the constructor, as a loaded model's are."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:  # a meta parameter assigned again (tied weights) stays itself
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to(META), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class Checkpoint:
    """The safetensors files of one model directory: which file holds each tensor, and reading some of them. Each read
    maps the files it needs and unmaps them after, so the mapped pages of weights already read do not stay in the
    process's memory."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():  # a sharded checkpoint: its shards only (a repository may hold other copies beside them)
            import json

            files = sorted({self.directory / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ValueError(f"engine.stream=true reads the weights from safetensors files, and {self.directory} holds "
                             f"none; convert the checkpoint to safetensors or set engine.stream=false")
        self.where: dict[str, Path] = {}
        for file in files:
            with safe_open(file, "pt") as handle:
                self.where.update((key, file) for key in handle.keys())

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors stored under ``keys``, each file opened once."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        for file in dict.fromkeys(self.where[key] for key in keys):
            with safe_open(file, "pt") as handle:
                out.update((key, handle.get_tensor(key)) for key in keys if self.where[key] == file)
        return out

    def keys_for(self, model: nn.Module, layer_prefixes: list[str]) -> tuple[dict[str, str], dict[int, list[str]]]:
        """Where each parameter of ``model`` is stored: ({parameter name: its checkpoint key} for those stored whole,
        under their own name, with or without the model's ``base_model_prefix``, or under a name transformers renames
        on load (e.g. Gemma 3 multimodal); {decoder layer index: the checkpoint keys transformers converts into that
        layer's parameters on load} (e.g. per-expert MoE weights fused into one tensor), by transformers' own mapping
        for the model. ValueError in one line naming what is stored nowhere."""
        params = dict(model.named_parameters())
        prefix = f"{getattr(model, 'base_model_prefix', '')}."
        keys: dict[str, str] = {}
        for name in params:
            candidates = [name, name.removeprefix(prefix) if name.startswith(prefix) else prefix + name]
            found = next((c for c in candidates if c in self.where), None)
            if found is not None:
                keys[name] = found
        converted: dict[int, list[str]] = {}
        if len(keys) < len(params):
            stored = set(keys.values())
            unplaced = [k for k in self.where if k not in stored]
            for key, (target, converter) in transformers_names(model, unplaced).items():
                if converter is None:
                    if target in params:
                        keys.setdefault(target, key)
                    continue
                layer = next((i for i, p in enumerate(layer_prefixes) if target.startswith(f"{p}.")), None)
                if layer is not None:
                    converted.setdefault(layer, []).append(key)
        missing = [n for n in params if n not in keys and not any(
            n.startswith(f"{layer_prefixes[i]}.") for i in converted)]
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise ValueError(f"engine.stream=true: {len(missing)} weight(s) of the model are stored nowhere in "
                             f"{self.directory}, under their own names or under the names transformers converts on "
                             f"load ({shown}); set engine.stream=false")
        return keys, converted


def transformers_names(model: nn.Module, keys: list[str]) -> dict[str, tuple[str, str | None]]:
    """{checkpoint key: (the parameter name transformers loads it into, the pattern of the converter that must
    combine it with others, or None for a plain renaming)}, by transformers' conversion mapping for ``model``."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    names = model.state_dict()
    return {key: rename_source_key(key, renamings, converters, model.base_model_prefix, names) for key in keys}


def load_converted(model: nn.Module, layer: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters of ``layer`` (a decoder layer of the skeleton ``model``) made from the checkpoint ``tensors`` by
    transformers' own loading conversion (the code ``from_pretrained`` runs), by their names in the layer; the layer
    is left as it was (on the meta device). RuntimeError when the tensors do not make every parameter."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig
    from transformers.utils import logging as hf_logging

    config = LoadStateDictConfig(device_map={"": "cpu"}, dtype=next(layer.parameters()).dtype,
                                 weight_mapping=get_model_conversion_mapping(model))
    skeleton = [(sub, attr, param) for sub in layer.modules() for attr, param in sub._parameters.items()]
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        convert_and_load_state_dict_in_model(model, tensors, config)
        state = {name: p.detach() for name, p in layer.named_parameters()}
    finally:
        if bar:
            hf_logging.enable_progress_bar()
        for sub, attr, param in skeleton:  # the skeleton's meta parameters back, whatever the loader put there
            sub._parameters[attr] = param
    unmade = [name for name, t in state.items() if t.is_meta]
    if unmade:
        raise RuntimeError(f"engine.stream=true: transformers' conversion of the checkpoint made no value for "
                           f"{', '.join(unmade[:3])}; set engine.stream=false")
    return state


Slot = tuple[list[tuple[nn.Module, str]], str]  # every (module, attribute) holding one parameter, and its name


def slots(module: nn.Module, skip: set[int] | None = None) -> list[Slot]:
    """One slot per parameter of ``module`` (tied weights: one slot, several holders), named as in ``module``;
    modules whose identity is in ``skip`` (and their parameters) are left out."""
    found: dict[int, Slot] = {}
    skipped = {id(p) for m in module.modules() if id(m) in (skip or set()) for p in m.parameters()}
    names = {id(p): n for n, p in module.named_parameters()}
    for sub in module.modules():
        for attr, param in sub._parameters.items():
            if param is not None and id(param) not in skipped:
                found.setdefault(id(param), ([], names[id(param)]))[0].append((sub, attr))
    return list(found.values())


def materialise(module_slots: list[Slot], read: Callable[[str], torch.Tensor], dtypes: Callable[[str], torch.dtype],
                device: torch.device | str) -> None:
    """Give every slot the tensor ``read(name)`` in ``dtypes(name)`` on ``device``; tied parameters stay tied."""
    for holders, name in module_slots:
        param = nn.Parameter(read(name).to(device=device, dtype=dtypes(name)), requires_grad=False)
        for owner, attr in holders:
            owner._parameters[attr] = param


def to_meta(module_slots: list[Slot], dtypes: Callable[[str], torch.dtype]) -> None:
    """Free every slot's parameter: a meta tensor of the same shape and ``dtypes(name)`` takes its place."""
    for holders, name in module_slots:
        old = holders[0][0]._parameters[holders[0][1]]
        param = nn.Parameter(torch.empty(old.shape, dtype=dtypes(name), device=META), requires_grad=False)
        for owner, attr in holders:
            owner._parameters[attr] = param


class InMemoryLayers:
    """The default: every layer is in memory; its turn moves it to the compute device and back."""

    def fetch(self, index: int, layer: nn.Module, device: torch.device | str,
              dtype: torch.dtype | None = None) -> None:
        layer.to(device)

    def release(self, index: int, layer: nn.Module, home: torch.device | str, changed: bool) -> None:
        layer.to(home)

    def offload_records(self, index: int, records: dict[str, Any] | None) -> None:
        """In memory, a compressor's records stay where they are."""


class StreamedLayers:
    """Layers read from the checkpoint (or, once compressed, from the offload folder) for their turn only."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, checkpoint: Checkpoint, folder: Path) -> None:
        self.checkpoint = checkpoint
        self.folder = Path(folder)
        full = {id(m): n for n, m in model.named_modules()}
        self.prefix = [full[id(layer)] for layer in layers]
        self.keys, self.converted = checkpoint.keys_for(model, self.prefix)
        self.model, self.layers = model, layers
        self._last_converted: tuple[int, dict[str, torch.Tensor]] | None = None
        self.dtypes = {n: p.dtype for n, p in model.named_parameters()}  # as the skeleton declares them
        self.slots = [slots(layer) for layer in layers]
        self.buffer_dtypes = {(id(sub), attr): buf.dtype for layer in layers for sub in layer.modules()
                              for attr, buf in sub._buffers.items() if buf is not None}
        self.written: dict[int, tuple[int, str]] = {}  # layer -> (size, xxh3) of the file this process wrote
        clear_offload(self.folder)

    def path(self, index: int) -> Path:
        return self.folder / LAYER_FILE.format(index)

    def tensor(self, name: str) -> torch.Tensor:
        """One dense weight of the model by its name, read from the checkpoint in the model's dtype."""
        if name in self.keys:
            return self.checkpoint.read([self.keys[name]])[self.keys[name]].to(self.dtypes[name])
        index = next(i for i in self.converted if name.startswith(f"{self.prefix[i]}."))
        if self._last_converted is None or self._last_converted[0] != index:  # one conversion per layer, not per name
            self._last_converted = index, self._dense_state(index)
        return self._last_converted[1][name.removeprefix(f"{self.prefix[index]}.")].to(self.dtypes[name])

    def _dense_state(self, index: int) -> dict[str, torch.Tensor]:
        """Layer ``index``'s dense weights as the checkpoint gives them, by their names in the layer."""
        prefix = self.prefix[index]
        if index not in self.converted:
            keys = {name: self.keys[f"{prefix}.{name}"] for _, name in self.slots[index]}
            stored = self.checkpoint.read(list(keys.values()))
            return {name: stored[key] for name, key in keys.items()}
        own = [self.keys[f"{prefix}.{name}"] for _, name in self.slots[index] if f"{prefix}.{name}" in self.keys]
        return load_converted(self.model, self.layers[index], self.checkpoint.read(own + self.converted[index]))

    def fetch(self, index: int, layer: nn.Module, device: torch.device | str,
              dtype: torch.dtype | None = None) -> None:
        """Read layer ``index`` onto ``device`` (in ``dtype`` when given, else the model's)."""
        self._last_converted = None  # what the fingerprint converted last is not kept through the run
        prefix = self.prefix[index]
        if index in self.written:
            from safetensors.torch import load_file

            state = load_file(self._checked(index, self.path(index)))
        else:
            state = self._dense_state(index)
        materialise(self.slots[index], state.__getitem__, lambda name: dtype or self.dtypes[f"{prefix}.{name}"],
                    device)
        for sub in layer.modules():
            for attr, buf in sub._buffers.items():
                if buf is not None:
                    cast = dtype if dtype is not None and buf.is_floating_point() else None
                    sub._buffers[attr] = buf.to(device=device, dtype=cast) if cast else buf.to(device)

    def release(self, index: int, layer: nn.Module, home: torch.device | str, changed: bool) -> None:
        """Free layer ``index``; ``changed``: its weights were edited, so write them to the offload folder first."""
        if changed:
            self._write(index, layer)
        prefix = self.prefix[index]
        to_meta(self.slots[index], lambda name: self.dtypes[f"{prefix}.{name}"])
        for sub in layer.modules():  # buffers stay real; a float32 evaluation's cast is undone
            for attr, buf in sub._buffers.items():
                if buf is not None:
                    sub._buffers[attr] = buf.to(device=home, dtype=self.buffer_dtypes[(id(sub), attr)])
        give_back_freed_memory()

    def _write(self, index: int, layer: nn.Module) -> None:
        state = {name: p.detach().to("cpu").contiguous() for name, p in layer.named_parameters()}
        self._write_file(index, self.path(index), state)

    def _write_file(self, key: Any, path: Path, state: dict[str, torch.Tensor]) -> None:
        """Write ``state`` to ``path`` (temporary, fsync, rename) and remember its size and digest under ``key``."""
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file(state, str(tmp))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        self.written[key] = (path.stat().st_size, file_digest(path))

    def _checked(self, key: Any, path: Path) -> Path:
        """``path``, if it is the file this process wrote under ``key``; else RuntimeError."""
        size, digest = self.written[key]
        if not path.is_file() or path.stat().st_size != size or file_digest(path) != digest:
            raise RuntimeError(f"the offloaded file {path} changed on disk since this run wrote it; the run "
                               f"cannot go on with it (rerun: the folder is cleared at the start)")
        return path

    def offload_records(self, index: int, records: dict[str, Any] | None) -> None:
        """Move the tensors of a compressor's records for layer ``index``'s modules (GPTQ's scales, zero points and
        group maps, needed only to export) into ``records-N.safetensors`` beside the layer, so that what a streamed
        run holds does not grow with the number of layers; each record becomes an :class:`OffloadedRecord`."""
        if not records:
            return
        inside = f"{self.prefix[index]}."
        names = [n for n, r in records.items() if n.startswith(inside) and not isinstance(r, OffloadedRecord)]
        tensors = {f"{n}|{field}": v.contiguous() for n in names for field, v in records[n].items()
                   if isinstance(v, torch.Tensor)}
        if not tensors:
            return
        path = self.folder / RECORDS_FILE.format(index)
        self._write_file(("records", index), path, tensors)
        for n in names:
            plain = {field: v for field, v in records[n].items() if not isinstance(v, torch.Tensor)}
            fields = [field for field, v in records[n].items() if isinstance(v, torch.Tensor)]
            records[n] = OffloadedRecord(self, index, n, plain, fields)

    def read_record(self, index: int, module: str, fields: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        path = self._checked(("records", index), self.folder / RECORDS_FILE.format(index))
        with safe_open(path, "pt") as handle:
            return {field: handle.get_tensor(f"{module}|{field}") for field in fields}

    def remove(self) -> None:
        """Delete the offloaded layers, and the folder when nothing else is in it (the run is over)."""
        remove_offload(self.folder)
        self.written.clear()


class OffloadedRecord(Mapping):
    """One module's compressor record in a streamed run: its plain fields (bits, groupsize, ...) in memory, its
    tensors read back from the layer's records file on each access (checked as the layer files are)."""

    def __init__(self, store: StreamedLayers, index: int, module: str, plain: dict[str, Any],
                 fields: list[str]) -> None:
        self.store, self.index, self.module, self.plain, self.fields = store, index, module, plain, fields

    def __getitem__(self, key: str) -> Any:
        if key in self.plain:
            return self.plain[key]
        if key not in self.fields:
            raise KeyError(key)
        return self.store.read_record(self.index, self.module, [key])[key]

    def __iter__(self) -> Iterator[str]:
        return iter([*self.plain, *self.fields])

    def __len__(self) -> int:
        return len(self.plain) + len(self.fields)

    def copy(self) -> dict[str, Any]:
        """The whole record as a dict, its tensors read in one pass (``dict.copy`` for an in-memory record)."""
        return {**self.plain, **self.store.read_record(self.index, self.module, self.fields)}


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to call
        return None


def give_back_freed_memory() -> None:
    """Return the memory of a freed layer to the system (glibc's malloc_trim). Without it glibc keeps freed large
    blocks for reuse, and a streamed run's peak memory grows with the number of layers."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _layer_files(folder: Path) -> list[Path]:
    """The layer files and write temporaries in an offload folder (nothing else in it is touched)."""
    if not folder.is_dir():
        return []
    return [*sorted(folder.glob(LAYER_FILE.replace("{:05d}", "*"))), *sorted(folder.glob(".layer-*.tmp*")),
            *sorted(folder.glob(RECORDS_FILE.replace("{:05d}", "*"))), *sorted(folder.glob(".records-*.tmp*"))]


def clear_offload(folder: Path) -> None:
    """Remove the layer files and temporaries a killed run left in ``folder``: a run reads only what it wrote."""
    stale = _layer_files(folder)
    if stale:
        log.info("streaming: removing %d layer file(s) left in %s by an earlier run", len(stale), folder)
    for path in stale:
        path.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)


def remove_offload(folder: Path) -> None:
    """Remove a run's offloaded layers, then the folder if that left it empty."""
    for path in _layer_files(folder):
        path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # missing, or holding files that are not ours
        pass


def attach(model: nn.Module, store: StreamedLayers) -> None:
    setattr(model, STORE_ATTR, store)


def layer_store(model: nn.Module) -> InMemoryLayers | StreamedLayers:
    """Where ``model``'s decoder layers wait between turns: its streamed store, else in memory."""
    return getattr(model, STORE_ATTR, None) or InMemoryLayers()


def is_streamed(model: nn.Module) -> bool:
    return isinstance(getattr(model, STORE_ATTR, None), StreamedLayers)


def streamed_tensor(model: nn.Module) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """For fingerprints: a parameter's dense value, read from the checkpoint when the skeleton holds no weight."""
    store = getattr(model, STORE_ATTR, None)

    def value(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return store.tensor(name) if tensor.is_meta and store is not None else tensor

    return value


@dataclass
class MemoryPlan:
    """Bytes a run holds at its peak, from the skeleton's shapes (no weights loaded): in memory, every weight and
    the calibration activations; streamed, the embeddings, final norm and head, the largest decoder layer and the
    hidden states of the calibration or of every evaluation window, whichever is more. Activations count twice (a
    layer's inputs and outputs while it runs). A lower bound: a compressor's statistics (GPTQ's Hessians) and the
    framework's own memory come on top."""

    weights: int
    outer: int
    largest_layer: int
    calibration: int  # hidden states of every calibration segment, once
    evaluation: int  # hidden states of every evaluation window, once

    @property
    def in_memory(self) -> int:
        return self.weights + 2 * self.calibration

    @property
    def streamed(self) -> int:
        return self.outer + self.largest_layer + 2 * max(self.calibration, self.evaluation)

    def streamed_parts(self) -> str:
        return (f"largest decoder layer {gb(self.largest_layer)} + embeddings, final norm and head {gb(self.outer)} "
                f"+ 2 x {gb(max(self.calibration, self.evaluation))} of "
                f"{'calibration' if self.calibration >= self.evaluation else 'evaluation'} hidden states")


def gb(size: int) -> str:
    """A size in GB (MB below 1 GB), as engine.max_memory takes it."""
    return f"{size / 1e9:.2f} GB" if size >= 10**9 else f"{size / 1e6:.1f} MB"


def memory_plan(skeleton: nn.Module, layers: nn.ModuleList, itemsize: int, calibration_tokens: int,
                evaluation_tokens: int) -> MemoryPlan:
    """The :class:`MemoryPlan` of a model whose weights take ``itemsize`` bytes per value."""
    def size(params) -> int:
        return sum(p.numel() for p in {id(p): p for p in params}.values()) * itemsize

    hidden = skeleton.get_input_embeddings().weight.shape[1]
    weights = size(skeleton.parameters())
    in_layers = size(layers.parameters())
    return MemoryPlan(weights, weights - in_layers, max(size(layer.parameters()) for layer in layers),
                      calibration_tokens * hidden * itemsize, evaluation_tokens * hidden * itemsize)
