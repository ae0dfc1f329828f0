"""The one place that knows how a decoder-only model is laid out: where the decoder layers are, how a layer is called
and what it returns, which matrices are Linear maps, and how hidden states become logits. Everything else in MBS
talks to models through :class:`Adapter`.

Nothing here is a table of model types: the layers are the one ModuleList of the model's own ``_no_split_modules``
classes (inside ``get_decoder()`` when a multimodal model also has vision layers), a layer's call and return value
are read from its signature and from one real call (engine.capture), GPT-2's ``Conv1D`` is seen as the Linear it is,
fused MoE experts as one Linear per expert (mbs/models/experts.py), and the logits are checked against the model's own
forward (:meth:`Adapter.check_logits`). ``model.layers_path`` overrides the layer search for an odd architecture.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Union

import torch
from torch import nn

from mbs.models.experts import ExpertView, expert_views, install_observers, is_fused_experts, remove_observers

LAYERS_PATH_ATTR = "_mbs_layers_path"  # set on a model by set_layers_path (from model.layers_path)


class Conv1DView:
    """GPT-2's ``Conv1D`` (y = x·W + b, W stored [in, out]) as the Linear map it is: ``weight`` is the [out, in]
    transpose, a view of the same storage, so compressors read and edit it exactly as an nn.Linear weight."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight.T

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[1]


LinearLike = Union[nn.Linear, Conv1DView, ExpertView]  # .weight [out, in] (editable in place), .in_features


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def set_layers_path(model: nn.Module, path: str | None) -> None:
    """Tell the adapter where the decoder-layer ModuleList is (``model.layers_path``), instead of searching."""
    setattr(model, LAYERS_PATH_ATTR, path or None)


def _describe(model: nn.Module) -> str:
    return f"model type {getattr(model.config, 'model_type', '?')!r} ({type(model).__name__})"


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(attribute path, ModuleList) of the decoder layers; ValueError in one line when they cannot be found."""
    hint = "set model.layers_path to the attribute path of its decoder-layer ModuleList (e.g. model.layers_path=model.layers)"
    override = getattr(model, LAYERS_PATH_ATTR, None)
    if override:
        try:
            layers = _get(model, override)
        except AttributeError:
            layers = None
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            raise ValueError(f"model.layers_path={override!r} does not name a non-empty ModuleList in {_describe(model)}")
        return override, layers
    classes = set(getattr(model, "_no_split_modules", None) or ())
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) and all(type(c).__name__ in classes for c in m)]
    if len(found) > 1:  # e.g. a multimodal model's vision encoder layers beside the text decoder's
        try:
            decoder = {id(m) for m in model.get_decoder().modules()}
        except (AttributeError, NotImplementedError, TypeError, ValueError):
            decoder = set()
        found = [(name, m) for name, m in found if id(m) in decoder] or found
    if len(found) != 1:
        reason = (f"several ModuleLists hold its layer classes ({', '.join(n for n, _ in found)})" if found else
                  f"no ModuleList holds its layer classes (_no_split_modules: {sorted(classes) or 'none'})")
        raise ValueError(f"cannot find the decoder layers of {_describe(model)}: {reason}; {hint}")
    return found[0]


class Adapter:
    def __init__(self, model: nn.Module, head_dtype: torch.dtype | None = None) -> None:
        self.model = model
        # the dtype of the head's matrix product in logits(); None: the model's (bf16 logits are rounded to 8 bits)
        self.head_dtype = head_dtype
        self.layers_path, self._layers = find_layers(model)

    @property
    def layers(self) -> nn.ModuleList:
        return self._layers

    @property
    def norm(self) -> nn.Module:
        """The final norm: the first norm module registered after the layers in the module that holds them (else the
        last one registered before them, as OPT does)."""
        parent = _get(self.model, self.layers_path.rpartition(".")[0]) if "." in self.layers_path else self.model
        children = list(parent.children())
        k = next(i for i, child in enumerate(children) if child is self._layers)
        after, before = ([c for c in part if "norm" in type(c).__name__.lower()] for part in (children[k + 1:],
                                                                                             children[:k]))
        if after or before:
            return after[0] if after else before[-1]
        raise AttributeError(f"no final norm found after the decoder layers of {_describe(self.model)}")

    def outer_modules(self) -> list[nn.Module]:
        """Every module outside the decoder layers (embeddings, rotary tables, final norm, head)."""
        inside = {id(m) for m in self._layers.modules()}
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

    def linears(self, layer: nn.Module) -> dict[str, LinearLike]:
        """The compressible matrices of one decoder layer, by their name inside it, each with an [out, in] weight:
        nn.Linear modules, GPT-2 Conv1D modules (as :class:`Conv1DView`) and every expert's matrices of fused MoE
        experts (``mlp.experts.3.down_proj``). Routers stay dense: a Linear directly beside the experts (a router or a
        shared-expert gate; most routers are not Linear modules at all) is left out, as llm-compressor's MoE recipes
        do: it is tiny, and its errors move tokens to other experts."""
        out: dict[str, LinearLike] = {}
        routers = set()
        for name, module in layer.named_modules():
            experts = getattr(module, "experts", None)
            if isinstance(experts, nn.Module):
                routers |= {id(c) for c in module.children() if isinstance(c, nn.Linear)}
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and id(module) not in routers:
                out[name] = module
            elif _is_conv1d(module):
                out[name] = Conv1DView(module)
            elif is_fused_experts(module):
                out.update(expert_views(module, name))
        return out

    def expert_tokens(self, module: LinearLike, statistic: Any) -> int | None:
        """How many calibration tokens the router sent to ``module`` (its statistic's count) when it is one expert's
        matrix; None for any other matrix (every token reaches it)."""
        return getattr(statistic, "tokens", None) if isinstance(module, ExpertView) else None

    def routed(self, layer: nn.Module) -> bool:
        """True when the layer routes tokens to experts: which matrices run then depends on the batch."""
        return any(name.rpartition(".")[2] == "experts" for name, _ in layer.named_modules())

    @contextmanager
    def observe(self, layer: nn.Module, record: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
        """Within the block, every call of a compressible matrix of ``layer`` first hands ``record`` its name and its
        input (an expert's input is only the tokens routed to it)."""
        handles = []
        for name, linear in self.linears(layer).items():
            module = linear if isinstance(linear, nn.Module) else getattr(linear, "module", None)
            if module is not None:
                handles.append(module.register_forward_pre_hook(lambda m, args, name=name: record(name, args[0])))
        patched = install_observers(layer, record)
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            remove_observers(patched)

    def split_call(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """A layer call as (hidden states, keyword arguments): positional arguments (GPT-2 and XGLM pass the mask
        positionally) are named by the layer's forward signature, so the call can be replayed as ``layer(x, **kw)``."""
        signature = inspect.signature(type(layer).forward)
        params = list(signature.parameters.values())
        if len(params) < 2 or params[1].kind is params[1].VAR_POSITIONAL:  # forward(self, *args, **kwargs)
            if len(args) != 1:
                raise RuntimeError(f"{_describe(self.model)}: cannot tell its layers' hidden states from their other "
                                   f"arguments (forward{signature})")
            return args[0], dict(kwargs)
        bound = signature.bind(layer, *args, **kwargs)
        named = {}
        for p in params[2:]:
            if p.name not in bound.arguments:
                continue
            value = bound.arguments[p.name]
            if p.kind is p.VAR_KEYWORD:
                named.update(value)
            elif p.kind is p.VAR_POSITIONAL:
                if value:
                    raise RuntimeError(f"{_describe(self.model)}: its layers take extra positional arguments; "
                                       f"MBS cannot replay their calls")
            else:
                named[p.name] = value
        return bound.arguments[params[1].name], named

    def unwrap(self, output: torch.Tensor | tuple) -> torch.Tensor:
        return output[0] if isinstance(output, (tuple, list)) else output

    def passthrough(self, hidden: torch.Tensor, like: torch.Tensor | tuple) -> torch.Tensor | tuple:
        """What a layer that changes nothing returns, shaped like a real layer output ``like`` (a tensor, or a tuple
        with the hidden states first, as BLOOM's and Falcon's layer loops expect)."""
        return (hidden,) + (None,) * (len(like) - 1) if isinstance(like, (tuple, list)) else hidden

    def logits(self, hidden: torch.Tensor, vocabulary: slice = slice(None)) -> torch.Tensor:
        """Final-norm'd hidden states to fp32 logits (of a slice of the vocabulary; the product in ``head_dtype`` when
        set, else in the model's dtype), with what the model's head does after its matrix: Cohere's ``logit_scale``, Granite's ``logits_scaling``, Gemma 2's soft-capping."""
        head = self.model.get_output_embeddings()
        bias = head.bias[vocabulary] if getattr(head, "bias", None) is not None else None
        weight = head.weight[vocabulary]
        if self.head_dtype is not None:
            hidden, weight = hidden.to(self.head_dtype), weight.to(self.head_dtype)
            bias = None if bias is None else bias.to(self.head_dtype)
        logits = nn.functional.linear(hidden, weight, bias).float()
        config = self.model.config
        if getattr(config, "logit_scale", None):
            logits = logits * config.logit_scale
        if getattr(config, "logits_scaling", None):
            logits = logits / config.logits_scaling
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.no_grad()
    def check_logits(self, input_ids: torch.Tensor, tolerance: float = 0.02) -> None:
        """Raise if :meth:`logits` of the base model's last hidden state differ from the model's own logits (an
        architecture whose head does something else must not give wrong perplexities silently)."""
        theirs = self.model(input_ids=input_ids, use_cache=False).logits.float()
        hidden = self.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        ours = self.logits(hidden)
        scale = theirs.abs().amax().item()
        diff = (ours - theirs).abs().amax().item()
        if ours.shape != theirs.shape or not diff <= tolerance * scale + 1e-4:
            raise RuntimeError(f"{_describe(self.model)}: logits from its hidden states differ from its own forward "
                               f"(max |diff| {diff:.3g} of max |logit| {scale:.3g}); its head does something MBS does "
                               f"not know (mbs/models/adapter.py Adapter.logits)")

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    def embed_forward_kwargs(self) -> dict:
        """Keyword arguments for a forward that only builds layer inputs."""
        return {"use_cache": False}
