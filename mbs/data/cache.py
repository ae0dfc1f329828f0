"""On-disk cache of tokenized text, so a sweep streams and tokenizes each language and split once.

What is cached is the token *stream* of a language and split; calibration segments and evaluation windows are cut
from it by a seeded ``randint`` and slicing, which costs microseconds. Keying the stream (not the segments) by
tokenizer, corpus config (and its files' sizes and mtimes), language and split means a sweep over seeds, seqlen,
segment counts or samplers re-uses it. Files are safetensors written atomically (temp file + ``os.replace``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch

from mbs.atomic import atomic_path

log = logging.getLogger(__name__)

VERSION = 1  # bump when token_stream() changes what it produces


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full serialisation (vocab, merges, normaliser), computed once per tokenizer object."""
    cached = getattr(tokenizer, "_mbs_fingerprint", None)
    if cached:
        return cached
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:  # slow tokenizers: the vocabulary and class identify them
        blob = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())], ensure_ascii=False)
    fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:24]
    try:
        tokenizer._mbs_fingerprint = fingerprint
    except AttributeError:
        pass
    return fingerprint


def corpus_fingerprint(corpus, language: str, split: str) -> dict:
    """The corpus config, plus the size and mtime of any local file the text comes from."""
    config = dataclasses.asdict(corpus) if dataclasses.is_dataclass(corpus) else {"repr": repr(corpus)}
    files = getattr(corpus, "source_files", None)
    stats = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files(language, split)] if files else []
    return {"class": type(corpus).__name__, "config": config, "files": stats}


def stream_key(tokenizer, corpus, language: str, split: str) -> str:
    blob = json.dumps({"v": VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
                       "corpus": corpus_fingerprint(corpus, language, split), "language": language, "split": split},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclasses.dataclass
class TokenCache:
    root: Path

    def path(self, key: str) -> Path:
        return Path(self.root) / f"{key}.safetensors"

    def load(self, key: str) -> torch.Tensor | None:
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.exists():
            return None
        try:
            return load_file(path)["ids"]
        except Exception as err:  # a damaged file is only a miss
            log.warning("ignoring unreadable token cache file %s: %s", path, err)
            return None

    def save(self, key: str, ids: torch.Tensor, meta: dict[str, str]) -> None:
        from safetensors.torch import save_file

        path = self.path(key)
        try:
            with atomic_path(path) as tmp:
                save_file({"ids": ids.contiguous()}, str(tmp), metadata=meta)
        except OSError as err:  # a read-only cache only costs speed
            log.warning("could not write token cache file %s: %s", path, err)
