"""What depends on the dense model and the data only — the per-language dense perplexity and the similarity probe's
activation vectors — computed once and reused by every job and sweep (they were a third of a default job).

An entry's key holds everything that determines its numbers: a digest of the weights themselves (so a changed model,
dtype or conversion can never hit a stale entry, whatever its name), the exact token ids evaluated, the settings that
change reductions (batch size, chunking, device), the numeric environment (threads, torch, transformers, the CPU
model and its float-kernel flags, BLAS, oneDNN, and on cuda the GPU: :func:`mbs.sweep.numeric_environment`, so an
entry computed on one CPU or GPU is not reused on another) and a digest of the source of the code that computes it
(editing the evaluation code invalidates every entry). Values are stored as JSON, whose floats round-trip exactly,
so a cached baseline equals a fresh evaluation bit for bit. Entries go through :mod:`mbs.cache` (locked,
checksummed, rebuilt when damaged); ``force=true`` recomputes and replaces them. The dense perplexity entry holds
each language's NLL and token count; the bytes behind bits per byte are not in it (they depend on the text alone
and are counted afresh every run, :func:`mbs.data.calibration.window_bytes`).
"""
from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import xxhash
from torch import nn

from mbs.atomic import atomic_write
from mbs.cache import Cache

VALUE = "value.json"


def weights_fingerprint(model: nn.Module) -> str:
    """xxh3-128 of every parameter and buffer (name, dtype, shape, bytes): 0.2 s for Gemma 3 270M in bf16 (measured)."""
    digest = xxhash.xxh3_128()
    for name, tensor in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def tokens_fingerprint(windows: Mapping[str, Iterable[torch.Tensor]]) -> str:
    """xxh3-128 of every language's token ids, window by window, in order."""
    digest = xxhash.xxh3_128()
    for language, language_windows in windows.items():
        digest.update(f"<{language}>".encode())
        for w in language_windows:
            digest.update(f"{w.numel()}|".encode())
            digest.update(w.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def source_fingerprint(*modules: ModuleType) -> str:
    """A digest of the modules' source: the code version of what they compute."""
    return hashlib.sha256("".join(inspect.getsource(m) for m in modules).encode()).hexdigest()[:16]


@dataclass
class DenseResults:
    """Dense-model results of one model's weights, cached under ``<cache>/dense/<kind>/<key digest>``."""

    cache: Cache
    weights: str  # weights_fingerprint of the dense model
    force: bool = False  # recompute (and replace) every entry this run asks for

    def get(self, kind: str, key: Mapping[str, Any], compute: Callable[[], Any]) -> tuple[Any, str, str]:
        """(value, "cached" or "computed", entry name); ``compute`` returns JSON-able data (floats round-trip)."""
        from mbs.sweep import numeric_environment

        environment = numeric_environment(key.get("device"))  # on cuda: with the GPU's name
        blob = json.dumps({"kind": kind, "weights": self.weights, "environment": environment, **key},
                          sort_keys=True, default=str)
        name = f"dense/{kind}/{hashlib.sha256(blob.encode()).hexdigest()[:24]}"
        computed: list[Any] = []

        def build(directory) -> None:
            computed.append(compute())
            atomic_write(directory / VALUE, json.dumps(computed[0]))
            atomic_write(directory / "key.json", blob)  # what the entry was computed from, for a reader

        path = self.cache.entry(name, build, f"dense {kind}", rebuild=self.force)
        if computed:
            return computed[0], "computed", name
        return json.loads((path / VALUE).read_text()), "cached", name
