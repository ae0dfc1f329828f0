"""The one place that knows BLOOM from Llama from Gemma: where the decoder layers are, what a layer returns, and how
hidden states become logits. Everything else in MBS talks to models through :class:`Adapter`."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Arch:
    layers: str  # attribute path of the decoder-layer ModuleList
    norm: str  # attribute path of the final norm
    tuple_output: bool  # a layer returns (hidden_states, ...) rather than a tensor


ARCHS: dict[str, Arch] = {
    "bloom": Arch("transformer.h", "transformer.ln_f", True),
    "llama": Arch("model.layers", "model.norm", False),
    "mistral": Arch("model.layers", "model.norm", False),
    "qwen2": Arch("model.layers", "model.norm", False),
    "qwen3": Arch("model.layers", "model.norm", False),
    "gemma": Arch("model.layers", "model.norm", False),
    "gemma2": Arch("model.layers", "model.norm", False),
    "gemma3_text": Arch("model.layers", "model.norm", False),
}


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


class Adapter:
    def __init__(self, model: nn.Module) -> None:
        model_type = model.config.model_type
        if model_type not in ARCHS:
            raise ValueError(f"model type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHS))}")
        self.model = model
        self.arch = ARCHS[model_type]

    @property
    def layers(self) -> nn.ModuleList:
        return _get(self.model, self.arch.layers)

    @property
    def norm(self) -> nn.Module:
        return _get(self.model, self.arch.norm)

    def outer_modules(self) -> list[nn.Module]:
        """Every module outside the decoder layers (embeddings, rotary tables, final norm, head)."""
        layers = self.layers
        inside = {id(m) for m in layers.modules()}
        outer, seen = [], set()
        for module in self.model.modules():
            if id(module) in inside or module is self.model:
                continue
            has_own = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
            if has_own and id(module) not in seen:
                seen.add(id(module))
                outer.append(module)
        return outer

    def move_outer(self, device: torch.device | str) -> None:
        """Move what runs before and after the layers; the layers stay where they are (one at a time on the device)."""
        for module in self.outer_modules():
            for name, param in module.named_parameters(recurse=False):
                param.data = param.data.to(device)
            for name, buf in module.named_buffers(recurse=False):
                module._buffers[name] = buf.to(device)

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The prunable matrices of one decoder layer, by their name inside it."""
        return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}

    def unwrap(self, output: torch.Tensor | tuple) -> torch.Tensor:
        return output[0] if isinstance(output, (tuple, list)) else output

    def passthrough(self, hidden: torch.Tensor) -> torch.Tensor | tuple:
        """What a layer that changes nothing returns, in the shape the model's layer loop expects."""
        return (hidden, None) if self.arch.tuple_output else hidden

    def logits(self, hidden: torch.Tensor, vocabulary: slice = slice(None)) -> torch.Tensor:
        """Final-norm'd hidden states to fp32 logits (of a slice of the vocabulary), with the model's logit
        soft-capping if it has one."""
        head = self.model.get_output_embeddings()
        bias = head.bias[vocabulary] if head.bias is not None else None
        logits = nn.functional.linear(hidden, head.weight[vocabulary], bias).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    def embed_forward_kwargs(self) -> dict:
        """Keyword arguments for a forward that only builds layer inputs."""
        return {"use_cache": False}
