"""Name -> implementation registries filled by decorators where the implementations are defined: compressors (each
class is the config schema of ``conf/compressor/<name>.yaml``) and compression pipelines (``engine.mode``).

A registry imports its built-in modules on first lookup, so it is complete whichever of them was imported first;
nothing here imports them at import time, so the modules that register can import this one.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from torch import nn

    from mbs.compress.base import Compressor
    from mbs.compress.engine import CompressionReport, EngineConfig, PipelineContext
    from mbs.data.calibration import CalibrationSet

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """A read-only mapping of names to registered objects, in registration order; ``register`` adds one."""

    def __init__(self, kind: str, builtin: tuple[str, ...]) -> None:
        self.kind = kind
        self._builtin = builtin  # modules whose import registers the built-in entries
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name``; a name taken by another object raises (re-importing a module does not)."""
        old = self._entries.get(name)
        if old is not None and _origin(old) != _origin(entry):
            raise ValueError(f"{self.kind} {name!r} is already registered ({_origin(old)})")
        self._entries[name] = entry
        return entry

    def _load(self) -> None:
        if not self._loaded:
            for module in self._builtin:
                importlib.import_module(module)
            self._loaded = True

    def __getitem__(self, name: str) -> T:
        self._load()
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(self._entries)

    def __len__(self) -> int:
        self._load()
        return len(self._entries)


def _origin(entry: Any) -> str:
    """Where an entry was defined: the same class or function defined again (a reloaded module) replaces itself."""
    target = entry.run if isinstance(entry, Pipeline) else entry
    return f"{target.__module__}.{target.__qualname__}"


COMPRESSORS: Registry[type] = Registry("compressor", ("mbs.compress.pruning", "mbs.compress.quantization",
                                                     "mbs.compress.sparsegpt", "mbs.compress.awq"))

C = TypeVar("C", bound=type)


def register_compressor(name: str) -> Callable[[C], C]:
    """Class decorator: the compressor ``name`` (``compressor=<name>``, schema ``<name>_schema``)."""
    return lambda cls: COMPRESSORS.register(name, cls)


PipelineFn = Callable[["nn.Module", "Compressor", "CalibrationSet", "EngineConfig", "PipelineContext"],
                      "CompressionReport"]
Check = Callable[["Compressor", "nn.Module"], None]  # (compressor, model skeleton) -> None, or raise


def _no_check(compressor: Compressor, skeleton: nn.Module) -> None:
    return None


@dataclass(frozen=True)
class Pipeline:
    """A compression loop: called as ``run`` is; ``check`` raises, on the model skeleton, before any weight is loaded,
    for what this loop cannot do."""

    run: PipelineFn
    check: Check = _no_check

    def __call__(self, model: nn.Module, compressor: Compressor, calibration: CalibrationSet, config: EngineConfig,
                 context: PipelineContext) -> CompressionReport:
        return self.run(model, compressor, calibration, config, context)


PIPELINES: Registry[Pipeline] = Registry("pipeline", ("mbs.compress.engine", "mbs.compress.cached"))


def register_pipeline(name: str, check: Check | None = None) -> Callable[[PipelineFn], PipelineFn]:
    """Function decorator: the compression loop ``engine.mode=<name>``, with its skeleton ``check``. Every pipeline
    takes ``(model, compressor, calibration, config: EngineConfig, context: PipelineContext)`` and returns a
    ``CompressionReport`` (mbs/compress/engine.py)."""

    def add(function: PipelineFn) -> PipelineFn:
        PIPELINES.register(name, Pipeline(function, check or _no_check))
        return function

    return add
