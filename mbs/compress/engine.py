"""The one sequential layer-wise engine every compressor plugs into.

1. Capture: run the model's embedding stage once per calibration batch with every decoder layer replaced by a
   pass-through, recording the first layer's input and each layer's arguments, by name (masks, rotary tables, alibi:
   they differ between layers and depend on the batch).
2. Per layer, on the compute device: hooks on its Linear maps (the adapter's: nn.Linear, GPT-2 Conv1D, each MoE
   expert's matrices fed only the tokens routed to it) accumulate the compressor's fp32 statistics (per language when
   asked, else over all; batches then mix languages); Linear maps fed the same tensor (q/k/v, gate/up) share one
   statistic; these forwards stop at the last Linear (not in MoE layers); the compressor edits the weights (an expert
   no token reached is left as is and reported); the layer is re-run so the next layer sees compressed outputs; the
   layer goes back to the offload device.

Where a layer waits between its turns is the model's layer store (mbs/models/streaming.py): in memory by default, or,
with ``engine.stream``, on disk (read from the checkpoint for its turn, written to an offload folder once compressed);
the loop calls ``fetch`` and ``release`` around each turn and is the same either way.

A non-uniform layer sparsity (``compressor.layer_sparsity=owl``) needs every layer's figure before the first layer is
compressed: :func:`dense_profile` first walks the dense layers once (the same statistics forwards on the calibration
inputs, each layer's dense outputs feeding the next, as the OWL reference does), then the pass above runs as usual.
It costs one more statistics forward and one more layer forward per layer, and a second copy of the hidden states.

The compression of one layer from its statistics is :func:`mbs.compress.step.compress_layer`, which the cached mode
(mbs/compress/cached.py) shares; both are registered as pipelines (``engine.mode``, mbs/compress/registry.py) called
as ``PIPELINES[mode](model, compressor, calibration, config, context)``.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from mbs.compress.base import Compressor, Statistic
from mbs.compress.registry import PIPELINES, register_pipeline
from mbs.compress.step import compress_layer, layer_record
from mbs.data.calibration import ALL_LANGUAGES, CalibrationSet, SegmentSource
from mbs.models.adapter import Adapter
from mbs.models.streaming import layer_store

if TYPE_CHECKING:
    from mbs.cache import Cache

log = logging.getLogger(__name__)

# (layer index, input-group name, {language: statistic}) -> None; lets later stages keep per-language statistics.
StatisticsObserver = Callable[[int, str, dict[str, Statistic]], None]


@dataclass
class EngineConfig:
    device: str = "cpu"  # where each layer runs (cuda on a GPU machine)
    offload_device: str = "cpu"  # where layers wait before and after their turn
    batch_size: int = 8
    per_language_statistics: bool = False  # keep one statistic per language (else one for all) for observers
    mode: str = "sequential"  # a registered pipeline; "cached": non-sequential, from cached per-language statistics
    statistics_pool: int = 0  # cached mode: segments forwarded per language at most (0: all the mixture's, exactly)
    # read each decoder layer from disk for its turn only (mbs/models/streaming.py); also chosen when max_memory is set
    # and the model's weights and activations would not fit in it
    stream: bool = False
    max_memory: Optional[str] = None  # memory the run may use, e.g. "8GB" or "512MiB"; None: no cap

    def __post_init__(self) -> None:
        if not isinstance(self.stream, bool):
            raise ValueError(f"engine.stream={self.stream!r} is not a boolean; allowed: true or false")
        self.max_memory_bytes = parse_size(self.max_memory, "engine.max_memory")
        if self.mode not in PIPELINES:
            raise ValueError(f"engine.mode={self.mode!r} is not a mode; allowed: {', '.join(PIPELINES)}")
        if self.statistics_pool < 0:
            raise ValueError(f"engine.statistics_pool={self.statistics_pool} must be >= 0 (0: every segment)")
        for key, mode in MODE_ONLY.items():  # a setting the chosen mode would ignore is refused, not dropped
            value, default = getattr(self, key), EngineConfig.__dataclass_fields__[key].default
            if self.mode != mode and value != default:
                value, default = (str(v).lower() if isinstance(v, bool) else v for v in (value, default))
                raise ValueError(f"engine.{key}={value} applies only to engine.mode={mode}, not to engine.mode="
                                 f"{self.mode}; leave it at {default} or set engine.mode={mode}")
        if self.batch_size < 1:
            raise ValueError(f"engine.batch_size={self.batch_size} must be >= 1")
        for key in ("device", "offload_device"):
            value = getattr(self, key)
            if not isinstance(value, str) or not DEVICE.fullmatch(value):
                raise ValueError(f"engine.{key}={value!r} is not a device; allowed: cpu, cuda, cuda:N, mps, xpu, xpu:N")


SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b)\s*", re.IGNORECASE)
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50}


def parse_size(value: Any, key: str) -> int | None:
    """Bytes of a size such as "8GB" (10^9), "7.5GiB" (2^30) or "512MB"; None stays None (no cap)."""
    if value is None:
        return None
    match = SIZE.fullmatch(str(value)) if isinstance(value, str) else None
    if match is None or match.group(2).lower() not in UNITS:
        raise ValueError(f"{key}={value!r} is not a size; allowed: a number with a unit (B, KB, MB, GB, TB, or KiB, "
                         f"MiB, GiB, TiB), e.g. 8GB, or null for no cap")
    size = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"{key}={value!r} must be more than 0 bytes (null: no cap)")
    return size


# settings read by one engine.mode only (the other ignores them)
MODE_ONLY = {"statistics_pool": "cached", "per_language_statistics": "sequential"}
DEVICE = re.compile(r"cpu|cuda(:\d+)?|mps|xpu(:\d+)?")


def check_device_available(device: str, key: str) -> None:
    """The device exists on this machine (a syntactically valid name can still name a GPU that is not there)."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return
    if kind == "mps":
        count = int(torch.backends.mps.is_available())
    else:
        backend = getattr(torch, kind)  # torch.cuda, torch.xpu
        count = backend.device_count() if backend.is_available() else 0
    if count == 0:
        raise ValueError(f"{key}={device!r} but no {kind.upper()} device is available; use {key}=cpu")
    if index and int(index) >= count:
        raise ValueError(f"{key}={device!r} but this machine has {count} {kind} device(s) (0..{count - 1})")


@dataclass
class PipelineContext:
    """What a pipeline may need beyond the model, compressor, calibration set and engine config; each pipeline reads
    the fields it uses, so every pipeline is called the same way."""

    progress: bool = True
    observer: StatisticsObserver | None = None  # sequential: handed each layer's per-language statistics
    source: SegmentSource | None = None  # cached: any number of each language's calibration segments
    weights: str = ""  # cached: fingerprint of the dense weights (part of the statistics' cache key)
    store: Cache | None = None  # cached: where statistics blocks are kept (None: computed in memory only)
    force: bool = False  # cached: recompute stored blocks


@dataclass
class Captured:
    """Layer-0 inputs per batch, each layer's kwargs per batch, and each batch's language."""

    inputs: list[torch.Tensor]
    layer_kwargs: list[list[dict[str, Any]]]  # [layer][batch]
    languages: list[str]
    sample: Any = None  # one real output of layer 0: what a layer returns (a tensor, or BLOOM's tuple)


@dataclass
class CompressionReport:
    layers: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    uncalibrated: list[str] = field(default_factory=list)  # "layer i name" of modules left as is: no token reached them
    statistics_blocks: dict[str, int] | None = None  # cached mode: {"loaded": n, "computed": n} statistics blocks
    profile: dict[str, Any] | None = None  # non-uniform layer sparsity: its figures and targets (Compressor.plan)

    @property
    def zeros(self) -> int:
        return sum(m["zeros"] for layer in self.layers for m in layer["modules"].values())

    @property
    def params(self) -> int:
        return sum(m["params"] for layer in self.layers for m in layer["modules"].values())

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0


class _StopForward(Exception):
    pass


def _to(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture(adapter: Adapter, batches: list[tuple[str, torch.Tensor]], device: torch.device | str,
            dtype: torch.dtype | None = None) -> Captured:
    """Record what every decoder layer is called with, running only layer 0, once, to learn what a layer returns
    (``dtype``: the one a streamed layer is read in for it, when not the model's; mbs/evaluate/streamed.py)."""
    layers = adapter.layers
    store = layer_store(adapter.model)
    adapter.move_outer(device)
    per_layer: list[list[dict[str, Any]]] = [[] for _ in layers]
    inputs: list[torch.Tensor] = []
    sample: list = []  # one real output of layer 0: a pass-through returns the same structure

    def passthrough(index: int):
        def forward(*args, **kwargs):
            hidden_states, kwargs = adapter.split_call(layers[index], args, kwargs)
            if index == 0:
                inputs.append(hidden_states)
                if not sample:
                    sample.append(_real_output(layers[0], hidden_states, kwargs, store, dtype))
            per_layer[index].append(kwargs)
            if index == len(layers) - 1:
                raise _StopForward
            return adapter.passthrough(hidden_states, sample[0])

        return forward

    for i, layer in enumerate(layers):
        layer.forward = passthrough(i)
    try:
        for _, input_ids in batches:
            try:
                adapter.model(input_ids=input_ids.to(device), **adapter.embed_forward_kwargs())
            except _StopForward:
                pass
    finally:
        for layer in layers:
            del layer.forward
    return Captured(inputs, per_layer, [lang for lang, _ in batches], sample[0] if sample else None)


def _real_output(layer: nn.Module, hidden_states: torch.Tensor, kwargs: dict[str, Any], store: Any,
                 dtype: torch.dtype | None = None) -> Any:
    """Layer 0's real output for one batch (the layer visits the batch's device for it, and goes back where it was)."""
    home = next((t.device for t in (*layer.parameters(), *layer.buffers()) if not t.is_meta), torch.device("cpu"))
    store.fetch(0, layer, hidden_states.device, dtype)
    try:
        return type(layer).forward(layer, hidden_states, **kwargs)
    finally:
        store.release(0, layer, home, changed=False)


@torch.no_grad()
def run_layer(layer: nn.Module, adapter: Adapter, inputs: list[torch.Tensor],
              kwargs: list[dict[str, Any]]) -> list[torch.Tensor]:
    return [adapter.unwrap(layer(x, **kw)) for x, kw in zip(inputs, kwargs)]


@torch.no_grad()
def collect_statistics(layer: nn.Module, adapter: Adapter, compressor: Compressor, inputs: list[torch.Tensor],
                       kwargs: list[dict[str, Any]], languages: list[str], per_language: bool
                       ) -> tuple[dict[str, dict[str, Statistic]], dict[str, str]]:
    """Forward every batch through ``layer`` and accumulate the compressor's statistic of each Linear's inputs.

    Returns ({group leader: {language or ALL_LANGUAGES: statistic}}, {module: its group leader}). Modules called with
    the very same input tensor in a forward form one group and share the leader's statistic, so it is computed once.
    The outputs are not needed, so after the first batch each forward stops at the last Linear call the first one
    made (the last Linear itself and what follows it are skipped), except in layers that route tokens to experts:
    there each expert's statistic gets exactly the tokens routed to it, and an expert no token reached gets none.
    """
    linears = adapter.linears(layer)
    stats: dict[str, dict[str, Statistic]] = {}
    groups = InputGroups()
    # "last": Linear calls in the first forward (0: not known yet; -1: never stop early, the calls vary with routing)
    current = {"language": "", "calls": 0, "last": -1 if adapter.routed(layer) else 0}
    buffers: dict[str, torch.Tensor] = {}  # one fp32 copy of each group's input, reused batch after batch

    def as_fp32(name: str, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.dtype == torch.float32:
            return flat
        buffer = buffers.get(name)
        if buffer is None or buffer.shape != flat.shape:
            buffer = buffers[name] = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
        return buffer.copy_(flat)  # cheaper than a fresh .float() copy per batch

    def record(name: str, x: torch.Tensor) -> None:
        current["calls"] += 1
        if groups.leads(name, x):
            by_language = stats.setdefault(name, {})
            key = current["language"] if per_language else ALL_LANGUAGES
            if key not in by_language:
                by_language[key] = compressor.new_statistic(linears[name])
            by_language[key].update(as_fp32(name, x))
        if current["calls"] == current["last"]:
            raise _StopForward

    with adapter.observe(layer, record):
        for x, kw, language in zip(inputs, kwargs, languages):
            current["language"] = language
            current["calls"] = 0
            try:
                layer(x, **kw)
            except _StopForward:
                pass
            if not current["last"]:
                current["last"] = current["calls"]
            elif current["last"] > 0 and current["calls"] != current["last"]:
                raise RuntimeError(f"the layer made {current['calls']} Linear calls in one forward and "
                                   f"{current['last']} in the first; cannot stop its statistics forwards early")
            groups.next_forward()
    return stats, groups.leader


class InputGroups:
    """Which Linear maps of a layer read the very same tensor in a forward (q/k/v, gate/up): one group, led by the
    first one called, whose statistic they share. The inputs of the current forward are held alive so their ids
    cannot be reused by other tensors; ``next_forward`` lets them go."""

    def __init__(self) -> None:
        self.leader: dict[str, str] = {}  # module -> its group leader
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}

    def leads(self, name: str, x: torch.Tensor) -> bool:
        """Record a call of ``name`` on ``x``; True when ``x`` is new in this forward, i.e. ``name`` leads a group."""
        hit = self._seen.get(id(x))
        new = hit is None or hit[0] is not x
        group = name if new else hit[1]
        if new:
            self._seen[id(x)] = (x, name)
        if self.leader.setdefault(name, group) != group:
            raise RuntimeError(f"{name}: input sharing changed between batches; cannot share statistics")
        return new

    def next_forward(self) -> None:
        self._seen.clear()


def merged(by_language: dict[str, Statistic], fresh: Callable[[], Statistic]) -> Statistic:
    """One statistic over all languages, summed into ``fresh()`` so the per-language statistics an observer keeps
    are left as they were (TokenSum merges add exactly: 0 + a = a, so the total is the same as summing in place)."""
    values = list(by_language.values())
    if len(values) == 1:
        return values[0]
    total = fresh()
    for statistic in values:
        total.merge(statistic)
    return total


class _ColumnSquaresProbe(Compressor):
    """Asks the statistics forwards for Wanda's Σx² whatever the compressor's own statistic (a layer profile's)."""

    def new_statistic(self, module: nn.Linear) -> Statistic:
        from mbs.compress.statistics import ColumnSquares

        return ColumnSquares(module.in_features, module.weight.device)


def layer_profile_figure(compressor: Compressor, linears: dict[str, Any], norms: dict[str, torch.Tensor]) -> float:
    """The compressor's figure of one dense layer, from the input norms of its matrices' groups (by module)."""
    return compressor.layer_figure({name: m.weight for name, m in linears.items()}, norms)


@torch.no_grad()
def dense_profile(adapter: Adapter, compressor: Compressor, captured: Captured, config: EngineConfig,
                  full: dict[int, str]) -> dict[str, Any]:
    """Walk the dense layers once on the captured calibration inputs (each layer's dense outputs feeding the next;
    ``captured`` is left as it was) and hand every layer's figure to ``compressor.plan``."""
    device = torch.device(config.device)
    hidden = list(captured.inputs)
    figures: list[float] = []
    modules: list[dict[str, int]] = []
    probe = _ColumnSquaresProbe()
    store = layer_store(adapter.model)
    for i, layer in enumerate(adapter.layers):
        store.fetch(i, layer, device)
        linears = adapter.linears(layer)
        stats, leader = collect_statistics(layer, adapter, probe, hidden, captured.layer_kwargs[i],
                                           captured.languages, per_language=False)
        norms = {name: stats[group][ALL_LANGUAGES].norm for name, group in leader.items()}
        figures.append(layer_profile_figure(compressor, linears, norms))
        modules.append({f"{full[id(layer)]}.{name}": m.weight.numel() for name, m in linears.items()})
        if i + 1 < len(adapter.layers):
            hidden = run_layer(layer, adapter, hidden, captured.layer_kwargs[i])
        store.release(i, layer, config.offload_device, changed=False)
    return compressor.plan(figures, modules)


def check_profile(compressor: Compressor, model: nn.Module) -> None:
    """A layer profile splits an exact budget over every matrix, so none may be left out: models that route tokens
    to experts (an expert no calibration token reaches is left dense) refuse it, on the skeleton."""
    if compressor.needs_profile and any(Adapter(model).routed(layer) for layer in Adapter(model).layers):
        raise ValueError(f"compressor.layer_sparsity={getattr(compressor, 'layer_sparsity', '')} cannot keep the "
                         f"global sparsity exact on a model that routes tokens to experts; use "
                         f"compressor.layer_sparsity=uniform")


def check_modules(model: nn.Module, compressor: Compressor) -> None:
    """Ask the compressor about every module it will see (shapes only: works on a meta-device skeleton)."""
    for name, module in layer_modules(model).items():
        compressor.check(name, module)
    compressor.check_layers(Adapter(model).layers)


def layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules the engine compresses, every decoder layer's, by full name."""
    adapter = Adapter(model)
    full = module_names(model)
    return {f"{full[id(layer)]}.{name}": m for layer in adapter.layers for name, m in adapter.linears(layer).items()}


def module_names(model: nn.Module) -> dict[int, str]:
    """Every module's full name in the model (``model.layers.0``), by identity: a compressible matrix is named
    ``<its layer's full name>.<its name in the layer>`` (``model.layers.0.self_attn.q_proj``, or
    ``model.layers.0.mlp.experts.3.down_proj`` for a fused expert's view), so compressors key their records by the
    name the checkpoint uses."""
    return {id(m): name for name, m in model.named_modules()}


@torch.no_grad()
def compress_model(model: nn.Module, compressor: Compressor, calibration: CalibrationSet, config: EngineConfig,
                   observer: StatisticsObserver | None = None, progress: bool = True) -> CompressionReport:
    """Compress every decoder layer in place, in order, each on the calibration data as the compressed earlier
    layers transform it. Embeddings and the LM head are never touched. Each layer is fetched for its turn and
    released after it by the model's layer store (mbs/models/streaming.py: moved to ``config.device`` and back, or,
    for a streamed model, read from disk and, once edited, written to the offload folder)."""
    adapter = Adapter(model)
    layers = adapter.layers
    store = layer_store(model)
    check_modules(model, compressor)
    check_profile(compressor, model)
    full = module_names(model)
    start = time.perf_counter()
    report = CompressionReport()
    if compressor.is_noop:
        for i, layer in enumerate(layers):
            store.fetch(i, layer, config.offload_device)
            step = compress_layer(adapter, full[id(layer)], adapter.linears(layer), compressor, {}, {})
            store.release(i, layer, config.offload_device, changed=False)
            report.layers.append(layer_record(i, 0.0, step.modules, step.shared_inputs))
        return report

    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # statistics and Hessians need full fp32 precision
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(config.device)
    try:
        captured = None
        if compressor.needs_statistics or compressor.needs_profile or compressor.needs_layer_inputs:
            batches = calibration.batches(config.batch_size, by_language=config.per_language_statistics)
            captured = capture(adapter, batches, device)
        if compressor.needs_profile:
            report.profile = dense_profile(adapter, compressor, captured, config, full)
        if not (compressor.needs_statistics or compressor.needs_layer_inputs):
            captured = None  # the profile's pre-pass was all that needed the inputs (magnitude)
        iterator = enumerate(layers)
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, total=len(layers), desc=f"compress ({type(compressor).__name__})", leave=False)
        for i, layer in iterator:
            t0 = time.perf_counter()
            store.fetch(i, layer, device)
            linears = adapter.linears(layer)
            stats, leader, totals = {}, {}, {}
            if captured is not None and compressor.needs_statistics:
                stats, leader = collect_statistics(layer, adapter, compressor, captured.inputs,
                                                   captured.layer_kwargs[i], captured.languages,
                                                   config.per_language_statistics)
                if observer is not None:
                    for group, by_language in stats.items():
                        observer(i, group, by_language)
                totals = {group: merged(by_language, lambda g=group: compressor.new_statistic(linears[g]))
                          for group, by_language in stats.items()}
            prepared, dense_outputs = None, None
            if compressor.needs_layer_inputs:
                if i + 1 < len(layers):  # the next layer is calibrated on this one's dense outputs (AWQ's reference)
                    dense_outputs = run_layer(layer, adapter, captured.inputs, captured.layer_kwargs[i])
                prepared = compressor.prepare_layer(layer, adapter, captured.inputs, captured.layer_kwargs[i])
            step = compress_layer(adapter, full[id(layer)], linears, compressor, totals, leader)
            report.uncalibrated += step.uncalibrated
            del stats, totals
            if dense_outputs is not None:
                captured.inputs = dense_outputs
            elif captured is not None and i + 1 < len(layers):
                captured.inputs = run_layer(layer, adapter, captured.inputs, captured.layer_kwargs[i])
            store.release(i, layer, config.offload_device, changed=compressor.edits_weights)
            store.offload_records(i, getattr(compressor, "records", None))
            report.layers.append(layer_record(i, time.perf_counter() - t0, step.modules, step.shared_inputs,
                                              prepared))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        adapter.move_outer(config.offload_device)
    report.seconds = time.perf_counter() - start
    if report.uncalibrated:
        log.warning("%d expert matrices saw no calibration token and were left as is: %s", len(report.uncalibrated),
                    ", ".join(report.uncalibrated))
    return report


@register_pipeline("sequential", check=check_profile)
def sequential(model: nn.Module, compressor: Compressor, calibration: CalibrationSet, config: EngineConfig,
               context: PipelineContext) -> CompressionReport:
    """``engine.mode=sequential``: :func:`compress_model`."""
    return compress_model(model, compressor, calibration, config, context.observer, context.progress)
