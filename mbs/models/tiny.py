"""Tiny randomly initialised models of the real architectures, with a small byte-level BPE tokenizer trained on the
embedded UDHR text, so tests and smoke runs exercise real model code offline in seconds."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mbs.cache import Cache

TINY_VOCAB = 512

_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512)
# Gemma 3 alternates sliding-window and global attention: a window shorter than the test sequences makes the two
# kinds of layer see different masks and rotary tables.
_GEMMA3_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=16, sliding_window=8, max_position_embeddings=512,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])

# tiny_arch -> (config class, model class, config arguments): one per layout family MBS supports.
TINY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=64, n_layer=3, n_head=4)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_LLAMA, sliding_window=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_LLAMA, head_dim=16)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_LLAMA, head_dim=16)),
    # Gemma 2: sliding/global layers and final logit soft-capping (30 by default)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_LLAMA, head_dim=16, sliding_window=8)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", _GEMMA3_TEXT),
    # Gemma 3 >= 4B: model_type gemma3, a SigLIP vision tower beside the text decoder (only the decoder is compressed)
    "gemma3_multimodal": ("Gemma3Config", "Gemma3ForConditionalGeneration", dict(
        text_config=_GEMMA3_TEXT, mm_tokens_per_image=4, boi_token_index=3, eoi_token_index=4, image_token_index=5,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14))),
    # mGPT is a GPT-2: Conv1D weights stored [in, out]
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=3, n_head=4, n_positions=512)),
    "xglm": ("XGLMConfig", "XGLMForCausalLM", dict(d_model=64, num_layers=3, attention_heads=4, ffn_dim=128,
                                                    max_position_embeddings=512)),
    # Cohere / Aya: parallel attention and MLP on one norm, logits scaled by logit_scale
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(_LLAMA, logit_scale=0.5)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_LLAMA, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(_LLAMA, num_experts=4, num_experts_per_tok=2,
                                                                moe_intermediate_size=32,
                                                                shared_expert_intermediate_size=64)),
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
    import transformers

    config_name, model_name, base = TINY[arch]
    ids = {"vocab_size": TINY_VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    kwargs = {**base, **dict(overrides)}
    if "text_config" in kwargs:  # multimodal: the vocabulary belongs to the text model
        kwargs["text_config"] = {**kwargs["text_config"], **ids}
    else:
        kwargs.update(ids)
    config = getattr(transformers, config_name)(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
    return model.to(dtype)
