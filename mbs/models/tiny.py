"""Tiny randomly initialised models of the real architectures, with a small byte-level BPE tokenizer trained on the
embedded UDHR text, so tests and smoke runs exercise real model code offline in seconds."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mbs.cache import Cache

TINY_VOCAB = 512

_BASE: dict[str, dict[str, Any]] = {
    "bloom": dict(hidden_size=64, n_layer=3, n_head=4),
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512),
    # Gemma 3 alternates sliding-window and global attention: a window shorter than the test sequences makes the two
    # kinds of layer see different masks and rotary tables.
    "gemma3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=16, sliding_window=8, max_position_embeddings=512,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
}


def tiny_tokenizer(cache: Cache | Path):
    """A 512-token byte-level BPE over the UDHR calibration text of the paper's languages (built once, then cached)."""
    from transformers import PreTrainedTokenizerFast

    def train(directory: Path) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        from mbs.data.corpora import UDHRCorpus
        from mbs.data.languages import PAPER_LANGUAGES

        corpus = UDHRCorpus()
        texts = [t for code in PAPER_LANGUAGES for t in corpus.texts(code, "calibration")]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<pad>", "<bos>", "<eos>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
        fast.save_pretrained(directory)

    cache = cache if isinstance(cache, Cache) else Cache(cache)
    directory = cache.entry(f"tiny-tokenizer-v1-{TINY_VOCAB}", train, "tiny tokenizer")
    return PreTrainedTokenizerFast.from_pretrained(directory)


def tiny_model(arch: str, overrides: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import (BloomConfig, BloomForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                              LlamaForCausalLM)

    classes = {"bloom": (BloomConfig, BloomForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
               "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}
    config_cls, model_cls = classes[arch]
    kwargs = {**_BASE[arch], **dict(overrides), "vocab_size": TINY_VOCAB, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": 0}
    config = config_cls(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(dtype)
