"""AWQ (Lin et al., MLSys 2024, arXiv 2306.00978), transcribed from its reference code (mit-han-lab/llm-awq,
``auto_scale.auto_scale_block`` and ``auto_clip.auto_clip_layer``), then group-wise round to nearest.

Per decoder layer, on the dense layer's calibration inputs:
1. Scale search, per scale group (mbs/models/scale_groups.py), all on the unscaled layer: for ratio r in 0, 1/n, ...,
   (n-1)/n, the scales s = mean|x|^r (clamped at 1e-4, divided by sqrt(max s * min s)) multiply the group's input
   columns, the weights are quantized and divided back, and the group's inspected module runs on its recorded inputs;
   the r with the least mean squared difference from the dense output wins.
2. Every group's scales fold into the op before it (its inverse) and into the group's columns.
3. Clip search, per Linear map except the query and key maps: per row and group, the largest |w| shrunk by
   1 - i/n for i < max_shrink·n, the one whose quantized group gives the least squared output error on the scaled
   inputs (every (tokens // clip_tokens)-th token); the weights are clamped to it.
4. Round to nearest on AWQ's grid (the group's own min and max) in ``compress``.
As in the reference, the next layer is calibrated on this layer's dense outputs (computed before the layer changes).

Deviations from the reference, none of which changes a result on its tested settings: the arithmetic runs in fp32 (or
the weights' dtype when wider) with scales rounded to the weights' dtype as the checkpoint stores them; the clip
search takes every token when there are fewer than ``clip_tokens`` (the reference's stride would be 0) and any row
count (the reference asserts rows divisible by 64); losses are summed over calibration batches in float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mbs.compress.grid import QuantSpec
from mbs.compress.quantization import RTN
from mbs.compress.registry import register_compressor
from mbs.models.adapter import Adapter
from mbs.models.scale_groups import ScaleGroup, check_scale_groups, fold_scales, scale_groups

NOT_CLIPPED = ("q_", "k_", "query", "key", "Wqkv")  # the reference leaves these unclipped (the q·k product)


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


@register_compressor("awq")
@dataclass
class AWQ(RTN):
    """Activation-aware weight quantization; ``sym=false`` is the reference's zero-point grid (its only tested one)."""

    needs_layer_inputs: ClassVar[bool] = True
    bits: int = 4
    groupsize: int = 128
    n_grid: int = 20  # scale ratios tried: 0, 1/n_grid, ..., (n_grid-1)/n_grid; clip shrink steps of 1/n_grid
    max_shrink: float = 0.5  # clip search: the largest |w| shrunk by at most this share
    clip_tokens: int = 512  # clip search: about this many calibration tokens (every (tokens // clip_tokens)-th)
    auto_scale: bool = True
    auto_clip: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_grid < 1:
            raise ValueError(f"compressor.n_grid={self.n_grid} must be >= 1")
        if not 0 <= self.max_shrink < 1:
            raise ValueError(f"compressor.max_shrink={self.max_shrink} must be in [0, 1)")
        if self.clip_tokens < 1:
            raise ValueError(f"compressor.clip_tokens={self.clip_tokens} must be >= 1")

    @property
    def spec(self) -> QuantSpec:
        # asymmetric: the reference's grid spans the group's own min and max (0 need not be a level)
        return QuantSpec(self.bits, self.sym, self.groupsize, zero_in_range=self.sym)

    def check_layers(self, layers: nn.ModuleList) -> None:
        check_scale_groups(layers)

    @torch.no_grad()
    def prepare_layer(self, layer: nn.Module, adapter: Adapter, inputs: list[torch.Tensor],
                      kwargs: list[dict[str, Any]]) -> dict[str, Any]:
        """Search and apply the layer's scales and clipping (steps 1-3) on its dense calibration inputs."""
        groups = scale_groups(layer)
        recorded = record_layer(layer, adapter, inputs, kwargs, groups)
        figures: dict[str, Any] = {}
        feats = recorded.linear_inputs
        if self.auto_scale:
            found = [(group, *self.search_scales(layer, adapter, group, recorded)) for group in groups]
            for group, scales, ratio, loss in found:
                fold_scales(layer, group, scales)
                for name in group.linears:  # what the clip search sees: the inputs of the scaled columns
                    feats[name] = [x / scales.to(x.dtype) for x in feats[name]]
                figures[group.prev] = {"ratio": ratio, "loss": loss}
        if self.auto_clip:
            shrink = {}
            for name, linear in adapter.linears(layer).items():
                if any(key in name for key in NOT_CLIPPED) or name not in feats:
                    continue
                max_val = self.search_clip(linear.weight, torch.cat([x.reshape(-1, x.shape[-1]) for x in feats[name]]))
                shrink[name] = float((max_val.squeeze(-1) / group_max(self.spec, linear.weight)).mean())
                apply_clip(linear.weight, max_val)
            figures["clip_mean_bound"] = shrink  # mean clipping bound per Linear, as a share of the group's max |w|
        return figures

    def search_scales(self, layer: nn.Module, adapter: Adapter, group: ScaleGroup,
                      recorded: "RecordedLayer") -> tuple[torch.Tensor, float, float]:
        """(best scales, their ratio, their loss) of one group (reference ``_search_module_scale``)."""
        modules = dict(layer.named_modules())
        fcs = [modules[name] for name in group.linears]
        originals = [fc.weight.data.clone() for fc in fcs]
        x = recorded.linear_inputs[group.linears[0]]
        x_max = torch.cat([_wide(t).abs().reshape(-1, t.shape[-1]) for t in x]).mean(0)
        spec = self.spec.for_weight(fcs[0].weight)
        best = (float("inf"), -1.0, None)
        try:
            for step in range(self.n_grid):
                ratio = step / self.n_grid
                scales = x_max.pow(ratio).clamp(min=1e-4).view(-1)
                scales = scales / (scales.max() * scales.min()).sqrt()
                for fc, w in zip(fcs, originals):
                    scaled = _wide(w) * scales.view(1, -1)
                    q = spec.quantize_groups(scaled, *spec.fit_groups(scaled))
                    fc.weight.data.copy_((q / scales.view(1, -1)).to(w.dtype))
                loss = recorded.loss(layer, adapter, group.inspect)
                if loss < best[0]:
                    best = (loss, ratio, scales)
        finally:
            for fc, w in zip(fcs, originals):
                fc.weight.data.copy_(w)
        if best[2] is None:
            raise RuntimeError(f"AWQ scale search for {', '.join(group.linears)}: no finite loss (every ratio gave "
                               f"NaN or inf)")
        return best[2], best[1], best[0]

    def search_clip(self, weight: torch.Tensor, x: torch.Tensor, rows_per_chunk: int = 256) -> torch.Tensor:
        """The best clipping bound per row and group, [rows, groups, 1] (reference ``auto_clip_layer``)."""
        rows, cols = weight.shape
        width = self.spec.group_width(cols)
        spec = self.spec.for_weight(weight)
        x = _wide(x).reshape(1, x.shape[0], cols // width, width)
        x = x[:, 0::max(1, x.shape[1] // self.clip_tokens)]
        best_all = []
        for start in range(0, rows, rows_per_chunk):
            w = _wide(weight[start:start + rows_per_chunk]).reshape(-1, 1, cols // width, width)
            org_max = w.abs().amax(dim=-1, keepdim=True)
            best = org_max.clone()
            least = torch.full_like(org_max, float("inf"))
            org_out = (x * w).sum(dim=-1)
            for i in range(int(self.max_shrink * self.n_grid)):
                max_val = org_max * (1 - i / self.n_grid)
                clipped = torch.clamp(w, -max_val, max_val)
                q = spec.quantize(clipped, *spec.fit(clipped))
                err = ((x * q).sum(dim=-1) - org_out).pow(2).mean(dim=1).view(least.shape)
                better = err < least
                least[better] = err[better]
                best[better] = max_val[better]
            best_all.append(best)
        return torch.cat(best_all).squeeze(1)


def group_max(spec: QuantSpec, weight: torch.Tensor) -> torch.Tensor:
    rows, cols = weight.shape
    width = spec.group_width(cols)
    return _wide(weight).reshape(rows, cols // width, width).abs().amax(-1).clamp_min(1e-30)


def apply_clip(weight: torch.Tensor, max_val: torch.Tensor) -> None:
    """Clamp every row and group of ``weight`` to ±max_val [rows, groups, 1] (reference ``apply_clip``)."""
    rows, cols = weight.shape
    grouped = _wide(weight).reshape(rows, max_val.shape[1], -1)
    weight.data.copy_(torch.clamp(grouped, -max_val, max_val).reshape(rows, cols).to(weight.dtype))


class RecordedLayer:
    """One dense forward of a layer per calibration batch: every Linear's input, and each inspected module's call
    (positional and keyword arguments) and output, so a scale candidate is judged by re-running that module alone."""

    def __init__(self) -> None:
        self.linear_inputs: dict[str, list[torch.Tensor]] = {}
        self.calls: dict[str, list[tuple[tuple, dict[str, Any]]]] = {}
        self.outputs: dict[str, list[torch.Tensor]] = {}

    def loss(self, layer: nn.Module, adapter: Adapter, inspect: str) -> float:
        """Mean squared difference between the inspected module's outputs now and its dense outputs."""
        module = layer if inspect == "" else dict(layer.named_modules())[inspect]
        total, count = 0.0, 0
        for (args, kwargs), dense in zip(self.calls[inspect], self.outputs[inspect]):
            out = adapter.unwrap(module(*args, **kwargs))
            total += float(_wide(dense - out).pow(2).sum(dtype=torch.float64))
            count += out.numel()
        return total / count


def record_layer(layer: nn.Module, adapter: Adapter, inputs: list[torch.Tensor], kwargs: list[dict[str, Any]],
                 groups: list[ScaleGroup]) -> RecordedLayer:
    recorded = RecordedLayer()
    modules = dict(layer.named_modules())
    inspected = {group.inspect for group in groups}
    handles = []
    for name, linear in adapter.linears(layer).items():
        handles.append(linear.register_forward_pre_hook(
            lambda m, args, name=name: recorded.linear_inputs.setdefault(name, []).append(args[0])))
    for name in inspected - {""}:
        handles.append(modules[name].register_forward_pre_hook(
            lambda m, args, kw, name=name: recorded.calls.setdefault(name, []).append((args, kw)), with_kwargs=True))
        handles.append(modules[name].register_forward_hook(
            lambda m, args, out, name=name: recorded.outputs.setdefault(name, []).append(adapter.unwrap(out))))
    try:
        for x, kw in zip(inputs, kwargs):
            out = adapter.unwrap(layer(x, **kw))
            if "" in inspected:
                recorded.calls.setdefault("", []).append(((x,), kw))
                recorded.outputs.setdefault("", []).append(out)
    finally:
        for handle in handles:
            handle.remove()
    return recorded
