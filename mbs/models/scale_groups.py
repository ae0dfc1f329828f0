"""Where a decoder layer can take AWQ's per-channel scales: groups of Linear maps that read one input, the operation
before them that the inverse scale folds into, and the module whose output the scale search compares.

These are the groups of the AWQ reference (mit-han-lab/llm-awq ``auto_scale_block``), found by module name inside a
layer as llm-compressor's AWQ mappings find them:
- Llama-style layers (Llama, Mistral, Qwen2/3, Gemma 1-3): the input norm before q/k/v (judged on the attention's
  output); v_proj before o_proj, only when their weights have one shape (no grouped-query attention); the norm before
  the MLP (Gemma 2/3: ``pre_feedforward_layernorm``) before gate/up (judged on the MLP's output); up_proj before
  down_proj.
- BLOOM: the input norm before query_key_value and the post-attention norm before dense_h_to_4h, both judged on the
  whole layer's output. The reference's third BLOOM group (the GELU before dense_4h_to_h) is left out: it inserts a
  scaling module into the model, which a transformers checkpoint cannot hold.
Other layouts are refused in one line (:func:`check_scale_groups`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED = "Llama-style layers (Llama, Mistral, Qwen2/3, Gemma 1-3) and BLOOM"


@dataclass(frozen=True)
class ScaleGroup:
    prev: str  # a norm or a Linear map, by name in the layer: the scales' inverse folds into its output channels
    linears: tuple[str, ...]  # the Linear maps that read prev's output: their input columns take the scales
    inspect: str  # the module whose output the search compares ("" = the whole layer)


def _modules(layer: nn.Module) -> dict[str, nn.Module]:
    return dict(layer.named_modules())


def scale_groups(layer: nn.Module) -> list[ScaleGroup]:
    """The layer's scale groups in the reference's order; ValueError in one line for a layout without them."""
    m = _modules(layer)
    has = lambda *names: all(n in m for n in names)  # noqa: E731
    if has("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        mlp_norm = next((n for n in ("pre_feedforward_layernorm", "post_attention_layernorm") if n in m), None)
        if mlp_norm is not None and not any("experts" in n for n in m):
            groups = [ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                 "self_attn")]
            if m["self_attn.v_proj"].weight.shape == m["self_attn.o_proj"].weight.shape:
                groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
            groups += [ScaleGroup(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
                       ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj")]
            return groups
    if has("input_layernorm", "self_attention.query_key_value", "post_attention_layernorm", "mlp.dense_h_to_4h"):
        return [ScaleGroup("input_layernorm", ("self_attention.query_key_value",), ""),
                ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), "")]
    raise ValueError(f"compressor=awq has no scale groups for {type(layer).__name__} layers; supported: {SUPPORTED}")


def check_scale_groups(layers: nn.ModuleList) -> None:
    """Every layer has scale groups (on a meta-device skeleton too: names and shapes only)."""
    for layer in layers:
        scale_groups(layer)


def _scales_weight_by_offset(norm: nn.Module) -> bool:
    """True when the norm multiplies by (1 + weight) (Gemma) rather than by weight: probed, with its weight (and bias)
    set to zero, on a random input (an output that is not zero then comes from the offset)."""
    saved = {name: p.detach().clone() for name, p in norm.named_parameters(recurse=False)}
    try:
        for p in norm.parameters(recurse=False):
            p.data.zero_()
        x = torch.randn(2, norm.weight.shape[0], dtype=norm.weight.dtype, device=norm.weight.device,
                        generator=torch.Generator(norm.weight.device).manual_seed(0))
        return bool(norm(x).abs().amax() > 0)
    finally:
        for name, p in norm.named_parameters(recurse=False):
            p.data.copy_(saved[name])


def _wide(t: torch.Tensor) -> torch.Tensor:
    """fp32 arithmetic, or the tensor's own when wider."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@torch.no_grad()
def fold_scales(layer: nn.Module, group: ScaleGroup, scales: torch.Tensor) -> None:
    """Divide prev's output channels by ``scales`` and multiply the group's input columns by them: the layer computes
    the same function (up to rounding in the weights' dtype), with the scaled columns quantized on finer grids."""
    m = _modules(layer)
    prev = m[group.prev]
    s = _wide(scales).to(prev.weight.device)
    if isinstance(prev, nn.Linear):  # the reference divides prev's last len(s) output rows (scale_fc_fc)
        rows = prev.weight.data[-s.numel():]
        rows.copy_((_wide(rows) / s.view(-1, 1)).to(rows.dtype))
        if prev.bias is not None:
            prev.bias.data.copy_((_wide(prev.bias.data) / s).to(prev.bias.dtype))
    else:  # a norm's elementwise weight (and bias) after normalising
        offset = _scales_weight_by_offset(prev)
        w = _wide(prev.weight.data)
        prev.weight.data.copy_((((1 + w) / s - 1) if offset else w / s).to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.data.copy_((_wide(prev.bias.data) / s).to(prev.bias.dtype))
    for name in group.linears:
        weight = m[name].weight.data
        weight.copy_((_wide(weight) * s.view(1, -1)).to(weight.dtype))
