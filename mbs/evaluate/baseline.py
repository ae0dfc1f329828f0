"""What depends on the dense model and the data only — the per-language dense perplexity, the similarity probe's
activation vectors and ``data=self``'s generated calibration segments — computed once and reused by every job and
sweep (the first two were a third of a default job).

An entry's key holds everything that determines its numbers: a digest of the weights themselves (so a changed model,
dtype or conversion can never hit a stale entry, whatever its name), the exact token ids evaluated, the settings that
change reductions (batch size, chunking, device), the numeric environment (threads, torch, transformers, the CPU
model and its float-kernel flags, BLAS, oneDNN, and on cuda the GPU: :func:`mbs.fingerprint.numeric_environment`, so an
entry computed on one CPU or GPU is not reused on another) and a digest of the source of the code that computes it
(editing the evaluation code invalidates every entry). Values are stored as JSON, whose floats round-trip exactly,
so a cached baseline equals a fresh evaluation bit for bit. Entries go through :mod:`mbs.cache` (locked,
checksummed, rebuilt when damaged); ``force=true`` recomputes and replaces them. The dense perplexity entry holds
each language's NLL and token count; the bytes behind bits per byte are not in it (they depend on the text alone
and are counted afresh every run, :func:`mbs.data.calibration.window_bytes`).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mbs.atomic import atomic_write
from mbs.cache import Cache
from mbs.fingerprint import numeric_environment

VALUE = "value.json"


@dataclass
class DenseResults:
    """Dense-model results of one model's weights, cached under ``<cache>/dense/<kind>/<key digest>``."""

    cache: Cache
    weights: str  # weights_fingerprint of the dense model
    force: bool = False  # recompute (and replace) every entry this run asks for

    def get(self, kind: str, key: Mapping[str, Any], compute: Callable[[], Any]) -> tuple[Any, str, str]:
        """(value, "cached" or "computed", entry name); ``compute`` returns JSON-able data (floats round-trip)."""

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
