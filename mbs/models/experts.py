"""Mixture-of-experts layers: each expert's matrices as their own Linear maps, with statistics from exactly the tokens
routed to that expert.

transformers 5 stores the experts of most MoE models (Mixtral, Qwen2/3-MoE, OLMoE, ... : every class decorated with
``use_experts_implementation``) fused: one module with 3-D parameters ``gate_up_proj`` (or ``up_proj``) and
``down_proj``, [expert, out, in] (or [expert, in, out] when ``is_transposed``), called with the router's choice
(``top_k_index``, ``top_k_weights``). :class:`ExpertView` shows one expert's gate, up or down matrix as an [out, in]
view of that storage, so compressors edit it in place like any Linear weight. :func:`observing_forward` replaces the
module's forward while statistics are collected: a per-expert loop, like the eager reference forward, that hands each
expert's inputs (the tokens routed to it, then its gated activations) to the engine. The router is never compressed.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

Record = Callable[[str, torch.Tensor], None]  # (name inside the layer, inputs [tokens, in_features])


def is_fused_experts(module: nn.Module) -> bool:
    """A module transformers' ``use_experts_implementation`` set up: its layout flags and 3-D expert weights."""
    down = getattr(module, "down_proj", None)
    return (isinstance(down, nn.Parameter) and down.dim() == 3 and hasattr(module, "has_gate")
            and hasattr(module, "is_transposed"))


def _up_name(experts: nn.Module) -> str:
    return "gate_up_proj" if experts.has_gate else "up_proj"


class ExpertView:
    """One expert's matrix as a Linear weight [out, in]: a view of the fused parameter (edits go to the model)."""

    def __init__(self, experts: nn.Module, parameter: str, index: int, rows: slice = slice(None)) -> None:
        self.experts, self.parameter, self.index, self.rows = experts, parameter, index, rows

    @property
    def weight(self) -> torch.Tensor:
        w = getattr(self.experts, self.parameter)[self.index]
        return (w.T if self.experts.is_transposed else w)[self.rows]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


def expert_views(experts: nn.Module, prefix: str) -> dict[str, ExpertView]:
    """``{prefix}.{e}.gate_proj`` / ``up_proj`` / ``down_proj`` of every expert. A fused gate_up matrix is split into
    its gate and up halves (interleaved rows when not ``is_concatenated``), as the unfused checkpoints store them."""
    views = {}
    up = _up_name(experts)
    for e in range(getattr(experts, up).shape[0]):
        if experts.has_gate:
            interleaved = not getattr(experts, "is_concatenated", True)
            half = getattr(experts, up).shape[1 if not experts.is_transposed else 2] // 2
            gate_rows, up_rows = (slice(0, None, 2), slice(1, None, 2)) if interleaved else (slice(0, half),
                                                                                             slice(half, None))
            views[f"{prefix}.{e}.gate_proj"] = ExpertView(experts, up, e, gate_rows)
            views[f"{prefix}.{e}.up_proj"] = ExpertView(experts, up, e, up_rows)
        else:
            views[f"{prefix}.{e}.up_proj"] = ExpertView(experts, up, e)
        views[f"{prefix}.{e}.down_proj"] = ExpertView(experts, "down_proj", e)
    return views


def _linear(x: torch.Tensor, experts: nn.Module, parameter: str, e: int) -> torch.Tensor:
    w = getattr(experts, parameter)[e]
    out = x @ w if experts.is_transposed else nn.functional.linear(x, w)
    if experts.has_bias:
        out = out + getattr(experts, f"{parameter}_bias")[e]
    return out


def observing_forward(experts: nn.Module, prefix: str, record: Record, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The experts' forward, one expert at a time over the tokens routed to it, recording each expert's inputs
    (gate and up receive the same tensor, so the engine gives them one shared statistic). Experts no token was routed
    to are never called, so they get no statistic. Called as the module is: (hidden states, top-k expert indices,
    top-k weights), whatever the model names them."""
    bound = inspect.signature(type(experts).forward).bind(experts, *args, **kwargs)
    hidden_states, top_k_index, top_k_weights = list(bound.arguments.values())[1:4]
    out = torch.zeros_like(hidden_states)
    up = _up_name(experts)
    for e in top_k_index.unique(sorted=True).tolist():
        if not 0 <= e < getattr(experts, up).shape[0]:
            continue  # expert-parallel sentinels
        token, slot = torch.where(top_k_index == e)
        x = hidden_states[token]
        if experts.has_gate:
            record(f"{prefix}.{e}.gate_proj", x)
            record(f"{prefix}.{e}.up_proj", x)
            h = experts._apply_gate(_linear(x, experts, up, e))
        else:
            record(f"{prefix}.{e}.up_proj", x)
            h = experts.act_fn(_linear(x, experts, up, e))
        record(f"{prefix}.{e}.down_proj", h)
        y = _linear(h, experts, "down_proj", e)
        if getattr(experts, "has_post_expert_norm", False):
            y = experts.post_expert_norm(y)
        out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
    return out


def install_observers(layer: nn.Module, record: Record) -> list[nn.Module]:
    """Route every fused experts module of ``layer`` through :func:`observing_forward`; returns them for
    :func:`remove_observers`."""
    patched = []
    for name, module in layer.named_modules():
        if is_fused_experts(module):
            module.forward = partial(observing_forward, module, name, record)
            patched.append(module)
    return patched


def remove_observers(modules: list[nn.Module]) -> None:
    for module in modules:
        del module.forward
