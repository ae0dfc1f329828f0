"""Per-language perplexity over non-overlapping windows, with the loss computed in chunks of tokens and slices of the
vocabulary, so a large vocabulary (Gemma: 262k) never materialises full logits."""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from mbs.models.adapter import Adapter


@dataclass
class LanguageLoss:
    nll: float  # summed negative log-likelihood, nats
    tokens: int  # predicted tokens
    bytes: int | None = None  # UTF-8 bytes of the text of the predicted tokens (mbs.data.calibration.window_bytes)

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def bpb(self) -> float | None:
        """Bits per byte: the summed NLL in bits over the bytes of the text predicted. Unlike perplexity per token,
        comparable across languages and tokenizers (a language's tokens per byte does not enter); None without bytes."""
        return self.nll / (math.log(2) * self.bytes) if self.bytes else None


# eval.dtype: "model" runs the whole evaluation in the model's dtype (bf16 logits: each rounded to 8 bits of mantissa);
# "float32-head" (default) keeps the body in the model's dtype and forms the logits from its hidden states in fp32;
# "float32" casts every weight to fp32 for the evaluation (given back after). On Gemma 3 270M, bf16 logits moved dense
# perplexities up to 3.1% from the fp32 evaluation (hi, bn), fp32 logits 0.35%, for 16% more time (benchmarks/
# eval_threads.py; README, Evaluation precision).
EVAL_DTYPES = ("model", "float32-head", "float32")
VOCAB_SLICE = 4096  # vocabulary entries per logits slab: chunk_tokens x 4096 fp32 values stay in cache


def summed_nll(adapter: Adapter, hidden: torch.Tensor, targets: torch.Tensor, vocab_slice: int = VOCAB_SLICE
               ) -> torch.Tensor:
    """Σ −log p(target) (fp64) over final hidden states [n, d], forming the fp32 logits one slice of the vocabulary
    at a time with a running log-sum-exp: neither the full logits nor their log-softmax is ever written out, which is
    faster and closer to an fp64 computation than fp32 cross-entropy on full logits (benchmarks/evaluation.py and
    the README give the figures)."""
    return token_nll(adapter, hidden, targets, vocab_slice)[0].double().sum()


def token_nll(adapter: Adapter, hidden: torch.Tensor, targets: torch.Tensor, vocab_slice: int = VOCAB_SLICE
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per target: −log p (fp32) and whether it is the most likely token, by the sliced running log-sum-exp."""
    n = targets.numel()
    running_max = torch.full((n,), -math.inf, device=hidden.device)
    scaled_sum = torch.zeros(n, device=hidden.device)  # Σ exp(logit − running_max)
    target_logit = torch.zeros(n, device=hidden.device)
    rows = torch.arange(n, device=hidden.device)
    vocab = adapter.vocab_size
    for start in range(0, vocab, vocab_slice):
        end = min(start + vocab_slice, vocab)
        logits = adapter.logits(hidden, slice(start, end))
        new_max = torch.maximum(running_max, logits.amax(dim=1))
        scaled_sum = scaled_sum * torch.exp(running_max - new_max) + torch.exp(logits - new_max[:, None]).sum(dim=1)
        running_max = new_max
        inside = (targets >= start) & (targets < end)
        picked = logits[rows, (targets - start).clamp(0, end - start - 1)]
        target_logit = torch.where(inside, picked, target_logit)
    return running_max + scaled_sum.log() - target_logit, target_logit >= running_max


@torch.no_grad()
def window_nll(model: nn.Module, adapter: Adapter, windows: torch.Tensor, chunk_tokens: int,
               vocab_slice: int = VOCAB_SLICE) -> tuple[float, int]:
    """Summed next-token NLL over a [batch, length] tensor of windows, and the number of predictions."""
    hidden = model.base_model(input_ids=windows, use_cache=False).last_hidden_state
    return hidden_nll(adapter, hidden, windows, chunk_tokens, vocab_slice)


def hidden_nll(adapter: Adapter, hidden: torch.Tensor, windows: torch.Tensor, chunk_tokens: int,
               vocab_slice: int = VOCAB_SLICE) -> tuple[float, int]:
    """Summed next-token NLL of a [batch, length] tensor of windows from their final (normed) hidden states
    [batch, length, d], the logits formed ``chunk_tokens`` tokens at a time; and the number of predictions."""
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = windows[:, 1:].reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for i in range(0, targets.numel(), chunk_tokens):
        total += summed_nll(adapter, hidden[i : i + chunk_tokens], targets[i : i + chunk_tokens], vocab_slice)
    return float(total), int(targets.numel())


@torch.no_grad()
def evaluate_languages(model: nn.Module, windows: dict[str, list[torch.Tensor]], device: torch.device | str,
                       batch_size: int = 8, chunk_tokens: int = 1024, progress: bool = True,
                       vocab_slice: int = VOCAB_SLICE, window_bytes: Mapping[str, Sequence[int]] | None = None,
                       dtype: str = "float32-head") -> dict[str, LanguageLoss]:
    """Perplexity of every language; windows of equal length are batched together (the last, shorter window of a
    language runs on its own, so no padding enters the loss). ``window_bytes`` (per language, per window:
    :func:`mbs.data.calibration.window_bytes`) gives each loss its bytes, hence bits per byte. ``dtype``: one of
    :data:`EVAL_DTYPES`, the precision of the evaluation."""
    check_eval_dtype(dtype)
    model.to(device)
    with evaluated_in(model, torch.float32 if dtype == "float32" else None):
        adapter = Adapter(model, head_dtype=torch.float32 if dtype == "float32-head" else None)
        return _evaluate(model, adapter, windows, device, batch_size, chunk_tokens, progress, vocab_slice,
                         window_bytes)


def check_eval_dtype(dtype: str) -> None:
    if dtype not in EVAL_DTYPES:
        raise ValueError(f"eval.dtype={dtype!r} is not one of {', '.join(EVAL_DTYPES)}")


@contextmanager
def evaluated_in(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Every floating-point parameter and buffer in ``dtype`` while the block runs, each given back its own dtype
    after (bf16 -> fp32 -> bf16 is exact), so compression and export see the weights as they were. None: as they are."""
    if dtype is None:
        yield
        return
    saved = [(t, t.dtype) for t in [*model.parameters(), *model.buffers()] if t.is_floating_point() and t.dtype != dtype]
    for t, _ in saved:
        t.data = t.data.to(dtype)
    try:
        yield
    finally:
        for t, original in saved:
            t.data = t.data.to(original)


def _evaluate(model: nn.Module, adapter: Adapter, windows: dict[str, list[torch.Tensor]], device: torch.device | str,
              batch_size: int, chunk_tokens: int, progress: bool, vocab_slice: int,
              window_bytes: Mapping[str, Sequence[int]] | None) -> dict[str, LanguageLoss]:
    first = next((w for ws in windows.values() for w in ws), None)
    if first is not None:  # the head's maths, checked against the model's own forward on a few tokens
        adapter.check_logits(first[:16].unsqueeze(0).to(device))
    results = {}
    items = windows.items()
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="evaluate", leave=False)
    for language, language_windows in items:
        nll, tokens = 0.0, 0
        for batch in language_batches(language_windows, batch_size):
            batch_nll, batch_tokens = window_nll(model, adapter, batch.to(device), chunk_tokens, vocab_slice)
            nll += batch_nll
            tokens += batch_tokens
        results[language] = LanguageLoss(nll, tokens, language_bytes(window_bytes, language, language_windows))
    return results


def language_batches(windows: Sequence[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """A language's windows in the batches they are evaluated in: equal lengths together, ``batch_size`` at most
    (the last, shorter window of a language runs on its own, so no padding enters the loss)."""
    by_length: dict[int, list[torch.Tensor]] = defaultdict(list)
    for w in windows:
        by_length[w.numel()].append(w)
    return [torch.stack(same[i : i + batch_size]) for same in by_length.values()
            for i in range(0, len(same), batch_size)]


def language_bytes(window_bytes: Mapping[str, Sequence[int]] | None, language: str, windows: Sequence[torch.Tensor]
                   ) -> int | None:
    """The bytes of a language's predicted text, from its per-window counts (None when there are none)."""
    if not window_bytes or language not in window_bytes:
        return None
    counts = window_bytes[language]
    if len(counts) != len(windows):
        raise ValueError(f"{language}: {len(counts)} byte counts for {len(windows)} windows")
    return int(sum(counts))
