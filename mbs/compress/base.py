"""The contract between the layer-wise engine and a compressor.

The engine owns the model, the activations and device moves; a compressor only says what statistic it needs of a
Linear module's inputs and how it edits that module's weight given the statistic.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn


class Statistic(Protocol):
    """Accumulates what a compressor needs to know about a Linear module's inputs, always in fp32."""

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs, shaped [tokens, in_features] and already fp32 (a buffer the engine reuses for the
        next batch: do not keep a reference to it)."""

    def merge(self, other: "Statistic") -> None:
        """Add another statistic of the same module (e.g. of another language) into this one."""


@dataclass
class Compressor:
    """Base of every compressor. Subclasses are dataclasses whose fields are their config (``conf/compressor/``),
    registered by name with ``@register_compressor`` (mbs/compress/registry.py)."""

    needs_statistics: ClassVar[bool] = False
    # True: the engine hands each dense layer and its calibration inputs to prepare_layer before compress (AWQ)
    needs_layer_inputs: ClassVar[bool] = False
    # False: compress() edits no weight (a statistics probe); a streamed model's layers are then not written back
    edits_weights: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every subclass's ``__post_init__`` first checks the types of the scalar fields, so that
        ``mbs.Wanda(sparsity="0.5")`` says which argument is wrong instead of failing inside a comparison."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None or getattr(own, "_checks_types", False):
            return

        @functools.wraps(own)
        def post_init(self, *args: Any, **kw: Any) -> None:
            check_field_types(self)
            own(self, *args, **kw)

        post_init._checks_types = True
        cls.__post_init__ = post_init

    def __post_init__(self) -> None:
        check_field_types(self)

    @property
    def is_noop(self) -> bool:
        """True when compress() would change no weight (the engine then skips the layer-wise pass)."""
        return False

    def check(self, name: str, module: nn.Linear) -> None:
        """Raise on a module this compressor cannot handle; called for every module before any work starts."""

    def check_layers(self, layers: nn.ModuleList) -> None:
        """Raise on a decoder-layer layout this compressor cannot handle (on the weightless skeleton too)."""

    def prepare_layer(self, layer: nn.Module, adapter: Any, inputs: list[torch.Tensor],
                      kwargs: list[dict[str, Any]]) -> dict[str, Any]:
        """Rewrite one dense layer, on its calibration inputs (one tensor and one set of call arguments per batch),
        before its matrices are compressed (``needs_layer_inputs``); return figures worth recording for the layer."""
        raise NotImplementedError

    def new_statistic(self, module: nn.Linear) -> Statistic | None:
        return None

    @property
    def needs_profile(self) -> bool:
        """True when the layers' sparsities depend on every layer's dense statistics (``layer_sparsity=owl``): the
        pipeline then calls :meth:`layer_figure` on each dense layer, and :meth:`plan` once, before compressing."""
        return False

    def layer_figure(self, weights: dict[str, torch.Tensor], norms: dict[str, torch.Tensor]) -> float:
        """One dense layer's figure for the profile, from its matrices' weights [out, in] and input norms ||X_j||₂
        [in] (of the dense model's inputs), by module name."""
        raise NotImplementedError

    def plan(self, figures: list[float], modules: list[dict[str, int]]) -> dict[str, Any]:
        """Fix each module's share of the work from every layer's figure (``modules``: per layer, {full name:
        parameters}); return what results.json records of the profile."""
        raise NotImplementedError

    def compress(self, name: str, module: nn.Linear, statistic: Statistic | None) -> dict[str, Any]:
        """Edit ``module.weight`` in place (statistics may be shared by modules with one input: do not modify them);
        return figures worth recording for this module. ``module`` is an nn.Linear or a view with the same ``weight``
        [out, in] and ``in_features`` (GPT-2 Conv1D, one MoE expert's slice of fused weights): write into
        ``module.weight`` (``.data[mask] = 0``, ``.data.copy_``), never assign a new tensor to it."""
        raise NotImplementedError


_SCALARS: dict[str, tuple[type, ...]] = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,)}


def check_field_types(obj: Any) -> None:
    """A TypeError naming the field of a dataclass whose scalar value (float, int, bool, str, optionally None) is of
    another type; fields of other types are left to their own checks."""
    for f in dataclasses.fields(obj):
        kind = str(f.type).replace("typing.", "").replace(" ", "")
        optional = kind.endswith("|None") or kind.startswith("None|") or kind.startswith("Optional[")
        kind = kind.removesuffix("|None").removeprefix("None|").removeprefix("Optional[").removesuffix("]") \
            if optional else kind
        allowed = _SCALARS.get(kind)
        value = getattr(obj, f.name, None)
        if allowed is None or (value is None and optional):
            continue
        if not isinstance(value, allowed) or (kind != "bool" and isinstance(value, bool)):
            raise TypeError(f"{type(obj).__name__}({f.name}={value!r}): {f.name} must be {'an' if kind == 'int' else 'a'} "
                            f"{kind}{' or None' if optional else ''}, not {type(value).__name__} "
                            f"(compressor.{f.name} in a run config)")
