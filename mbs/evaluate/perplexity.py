"""Per-language perplexity over non-overlapping windows, with the loss computed in chunks of tokens so a large
vocabulary (Gemma: 262k) never materialises full logits."""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mbs.models.adapter import Adapter


@dataclass
class LanguageLoss:
    nll: float  # summed negative log-likelihood, nats
    tokens: int  # predicted tokens

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


@torch.no_grad()
def window_nll(model: nn.Module, adapter: Adapter, windows: torch.Tensor, chunk_tokens: int) -> tuple[float, int]:
    """Summed next-token NLL (fp32) over a [batch, length] tensor of windows, and the number of predictions."""
    hidden = model.base_model(input_ids=windows, use_cache=False).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = windows[:, 1:].reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for i in range(0, targets.numel(), chunk_tokens):
        logits = adapter.logits(hidden[i : i + chunk_tokens])
        total += F.cross_entropy(logits, targets[i : i + chunk_tokens], reduction="sum").double()
    return float(total), int(targets.numel())


@torch.no_grad()
def evaluate_languages(model: nn.Module, windows: dict[str, list[torch.Tensor]], device: torch.device | str,
                       batch_size: int = 8, chunk_tokens: int = 1024, progress: bool = True) -> dict[str, LanguageLoss]:
    """Perplexity of every language; windows of equal length are batched together (the last, shorter window of a
    language runs on its own, so no padding enters the loss)."""
    adapter = Adapter(model)
    model.to(device)
    results = {}
    items = windows.items()
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="evaluate", leave=False)
    for language, language_windows in items:
        by_length: dict[int, list[torch.Tensor]] = defaultdict(list)
        for w in language_windows:
            by_length[w.numel()].append(w)
        nll, tokens = 0.0, 0
        for same in by_length.values():
            for i in range(0, len(same), batch_size):
                batch = torch.stack(same[i : i + batch_size]).to(device)
                batch_nll, batch_tokens = window_nll(model, adapter, batch, chunk_tokens)
                nll += batch_nll
                tokens += batch_tokens
        results[language] = LanguageLoss(nll, tokens)
    return results
