"""On-disk cache of tokenized text, so a sweep streams and tokenizes each language and split once.

What is cached is the token *stream* of a language and split; calibration segments and evaluation windows are cut
from it by a seeded ``randint`` and slicing, which costs microseconds. Keying the stream (not the segments) by
tokenizer, corpus config (and a digest of its local files' bytes), language and split means a sweep over seeds,
seqlen, segment counts or samplers re-uses it. Each stream is a safetensors file in an :mod:`mbs.cache` entry
(checksummed, built under a lock, renamed into place).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from mbs.cache import Cache
from mbs.fingerprint import corpus_fingerprint, tokenizer_fingerprint

VERSION = 2  # bump when token_stream() changes what it produces
FILE = "ids.safetensors"


def stream_key(tokenizer, corpus, language: str, split: str) -> str:
    blob = json.dumps({"v": VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
                       "corpus": corpus_fingerprint(corpus, language, split), "language": language, "split": split},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclasses.dataclass
class TokenCache:
    """Token streams as entries of an :class:`mbs.cache.Cache` (checked on every load, built under a lock)."""

    root: Path

    def stream(self, key: str, compute: Callable[[], torch.Tensor], meta: dict[str, str]) -> torch.Tensor:
        """The cached stream of ``key``, or ``compute()``'s, cached for the next run."""
        from safetensors.torch import load_file, save_file

        built: dict[str, torch.Tensor] = {}

        def build(directory: Path) -> None:
            built["ids"] = compute()
            save_file({"ids": built["ids"].contiguous()}, str(directory / FILE), metadata=meta)

        directory = Cache(self.root).entry(key, build, f"token stream {meta.get('language')}/{meta.get('split')}")
        return built["ids"] if "ids" in built else load_file(directory / FILE)["ids"]
