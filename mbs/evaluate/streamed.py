"""Per-language perplexity of a streamed model (``engine.stream=true``, mbs/models/streaming.py): every evaluation
window of every language through decoder layer i, then layer i+1, each layer read for its turn only, the hidden
states waiting on the offload device; then the final norm and the loss, chunked over tokens and sliced over the
vocabulary by the very arithmetic of mbs/evaluate/perplexity.py. The windows are batched as there, so the
perplexities equal the in-memory evaluation's bit for bit (tested)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mbs.compress.engine import capture
from mbs.evaluate.perplexity import (VOCAB_SLICE, LanguageLoss, check_eval_dtype, evaluated_in, hidden_nll,
                                     language_batches, language_bytes)
from mbs.models.adapter import Adapter
from mbs.models.streaming import layer_store


@torch.no_grad()
def evaluate_streamed(model: nn.Module, windows: dict[str, list[torch.Tensor]], device: torch.device | str,
                      offload_device: torch.device | str = "cpu", batch_size: int = 8, chunk_tokens: int = 1024,
                      progress: bool = True, vocab_slice: int = VOCAB_SLICE,
                      window_bytes: Mapping[str, Sequence[int]] | None = None,
                      dtype: str = "float32-head") -> dict[str, LanguageLoss]:
    """As :func:`mbs.evaluate.perplexity.evaluate_languages`, one decoder layer at a time."""
    check_eval_dtype(dtype)
    cast = torch.float32 if dtype == "float32" else None
    outer = nn.ModuleList(Adapter(model).outer_modules())
    with evaluated_in(outer, cast):
        adapter = Adapter(model, head_dtype=torch.float32 if dtype == "float32-head" else None)
        batches = [(language, batch) for language, ws in windows.items() for batch in language_batches(ws, batch_size)]
        if not batches:
            return {}
        captured = capture(adapter, batches, device, cast)  # embeddings, and each layer's call arguments per batch
        check_head(adapter, batches[0][1][0, :16].unsqueeze(0).to(device), captured.sample)
        hidden = [x.to(offload_device) for x in captured.inputs]
        store = layer_store(model)
        layers = enumerate(adapter.layers)
        if progress:
            from tqdm import tqdm

            layers = tqdm(layers, total=len(adapter.layers), desc="evaluate (streamed)", leave=False)
        for i, layer in layers:
            store.fetch(i, layer, device, cast)
            try:
                hidden = [adapter.unwrap(layer(x.to(device), **kw)).to(offload_device)
                          for x, kw in zip(hidden, captured.layer_kwargs[i])]
            finally:
                store.release(i, layer, offload_device, changed=False)
        norm = adapter.norm
        totals: dict[str, list] = {language: [0.0, 0] for language in windows}
        for (language, batch), h in zip(batches, hidden):
            nll, tokens = hidden_nll(adapter, norm(h.to(device)), batch.to(device), chunk_tokens, vocab_slice)
            totals[language][0] += nll
            totals[language][1] += tokens
    adapter.move_outer(offload_device)
    return {language: LanguageLoss(nll, tokens, language_bytes(window_bytes, language, windows[language]))
            for language, (nll, tokens) in totals.items()}


def check_head(adapter: Adapter, input_ids: torch.Tensor, sample: object) -> None:
    """:meth:`Adapter.check_logits` with every decoder layer passing its input through (so no layer's weights are
    needed): the model's own logits against ours, from the same final hidden states."""
    layers = adapter.layers

    def passthrough(layer: nn.Module):
        def forward(*args, **kwargs):
            return adapter.passthrough(adapter.split_call(layer, args, kwargs)[0], sample)

        return forward

    for layer in layers:
        layer.forward = passthrough(layer)
    try:
        adapter.check_logits(input_ids)
    finally:
        for layer in layers:
            del layer.forward
