import math

import torch

from conftest import ARCHS, tiny
from mbs.data.calibration import eval_windows
from mbs.evaluate.perplexity import evaluate_languages

import pytest


@pytest.mark.parametrize("arch, vocab_slice, softcap", [(arch, 4096, None) for arch in ARCHS]
                         + [("llama", 100, None), ("gemma3", 100, 5.0)])
def test_perplexity_equals_hand_computation(arch, vocab_slice, softcap):
    """Slices of 100 over the tiny models' 512-entry vocabulary exercise the running log-sum-exp (the last slice is
    short); Gemma's logit soft-capping is applied by the model's own forward in the hand computation."""
    model = tiny(arch)
    if softcap:
        model.config.final_logit_softcapping = softcap
    stream = torch.randint(3, 512, (70,), generator=torch.Generator().manual_seed(0))
    windows = eval_windows(stream, seqlen=16, prefix=[1])  # 15 text tokens + <bos> per window; last one shorter
    assert [w.numel() for w in windows] == [16] * 4 + [11]
    assert torch.equal(torch.cat([w[1:] for w in windows]), stream)  # every token scored once, no overlap

    nll, count = 0.0, 0
    for w in windows:
        logp = torch.log_softmax(model(input_ids=w[None]).logits[0].double(), dim=-1)
        nll -= logp[torch.arange(w.numel() - 1), w[1:]].sum().item()
        count += w.numel() - 1
    expected = math.exp(nll / count)

    result = evaluate_languages(model, {"xx": windows}, "cpu", batch_size=3, chunk_tokens=7, progress=False,
                                vocab_slice=vocab_slice)["xx"]
    assert result.tokens == count == 70  # with <bos>, every text token is predicted
    assert result.perplexity == pytest.approx(expected, rel=1e-5)


def test_windows_cap_and_short_tail():
    stream = torch.arange(10)
    assert [w.tolist() for w in eval_windows(stream, 4, [])] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(eval_windows(stream, 4, [], max_windows=2)) == 2
    assert [w.tolist() for w in eval_windows(torch.arange(5), 4, [])] == [[0, 1, 2, 3]]  # a 1-token tail predicts nothing


def byte_fallback_tokenizer():
    """A SentencePiece-style tokenizer as Gemma, Llama 2 and Mixtral have: '▁' for spaces (prepended to the text),
    characters outside the vocabulary as <0xNN> byte tokens, a decoder that drops the leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mbs.data.corpora import UDHRCorpus

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<bos>", "<eos>"]
                                  + [f"<0x{i:02X}>" for i in range(256)], limit_alphabet=60, show_progress=False)
    tok.train_from_iterator([t for code in ("en", "sw", "fr") for t in UDHRCorpus().texts(code, "calibration")],
                            trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


@pytest.mark.parametrize("kind", ["byte-level", "byte-fallback"])
@pytest.mark.parametrize("bos", [True, False])
def test_window_bytes_add_up_to_the_text(tokenizer, kind, bos):
    """Windows of 16 tokens cut characters between byte tokens often (Chinese and Hindi are mostly byte tokens in
    both 512-600-entry vocabularies); the predicted tokens' bytes still add up to the text's UTF-8 bytes exactly,
    less each window's first token without <bos> (context, not predicted). The Metaspace tokenizer adds one space
    in front of the text."""
    from mbs.data.calibration import decoded_window_bytes, token_bytes, token_stream, window_bytes
    from mbs.data.corpora import UDHRCorpus

    tok = tokenizer if kind == "byte-level" else byte_fallback_tokenizer()
    table = token_bytes(tok)
    assert table is not None
    for language in ("en", "zh-Hans", "hi", "ar"):
        texts = UDHRCorpus().texts(language, "evaluation")
        text_bytes = len("\n\n".join(texts).encode("utf-8"))
        stream = token_stream(tok, texts)
        windows = eval_windows(stream, 16, [tok.bos_token_id] if bos else [])
        counts = window_bytes(tok, {language: windows}, bos)[language]
        assert len(counts) == len(windows) and min(counts) > 0
        context = 0 if bos else sum(int(table[w[0]]) for w in windows)
        assert sum(counts) + context == text_bytes + (kind == "byte-fallback"), language
        assert int(table[stream].sum()) == text_bytes + (kind == "byte-fallback")
        if kind == "byte-level":  # decoding (a tokenizer token_bytes cannot read): within a few bytes per window
            decoded = decoded_window_bytes(tok, {language: windows}, bos)[language]
            assert abs(sum(decoded) - sum(counts)) <= 4 * len(windows), language


def test_bits_per_byte_is_nll_over_ln2_bytes(tokenizer):
    from mbs.data.calibration import build_eval_windows, window_bytes
    from mbs.data.corpora import UDHRCorpus
    from mbs.evaluate.perplexity import LanguageLoss

    windows = build_eval_windows(tokenizer, UDHRCorpus(), ["en", "zh-Hans"], 32, True, max_windows=3)
    counts = window_bytes(tokenizer, windows, True)
    model = tiny("llama")
    plain = evaluate_languages(model, windows, "cpu", progress=False)
    result = evaluate_languages(model, windows, "cpu", progress=False, window_bytes=counts)
    for language, loss in result.items():
        assert loss.nll == plain[language].nll and plain[language].bytes is None and plain[language].bpb is None
        assert loss.bytes == sum(counts[language]) > loss.tokens
        assert loss.bpb == pytest.approx(loss.nll / (math.log(2) * loss.bytes), rel=1e-12)
    assert LanguageLoss(nll=2 * math.log(2), tokens=1, bytes=2).bpb == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 byte counts for 3 windows"):
        evaluate_languages(model, windows, "cpu", progress=False, window_bytes={"en": [1, 2]})


def test_eval_dtype_float32_evaluates_in_fp32_and_gives_the_weights_back():
    """eval.dtype=float32 on a bf16 model is the evaluation of its fp32 copy, and leaves every weight and buffer as it
    was (bf16 -> fp32 -> bf16 is exact); float32-head forms the logits from the bf16 body's hidden states in fp32."""
    import copy

    from mbs.models.adapter import Adapter

    model = tiny("gemma3").to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k: v.dtype for k, v in model.named_buffers()}
    stream = torch.randint(3, 512, (70,), generator=torch.Generator().manual_seed(0))
    windows = {"xx": eval_windows(stream, seqlen=16, prefix=[1])}
    fp32 = evaluate_languages(copy.deepcopy(model).float(), windows, "cpu", 3, 7, progress=False, dtype="model")
    cast = evaluate_languages(model, windows, "cpu", 3, 7, progress=False, dtype="float32")
    assert cast["xx"].nll == fp32["xx"].nll
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in model.state_dict().items())
    assert {k: v.dtype for k, v in model.named_buffers()} == buffers
    hidden = model.base_model(input_ids=windows["xx"][0][None]).last_hidden_state[0]
    head = model.get_output_embeddings().weight
    assert torch.equal(Adapter(model, head_dtype=torch.float32).logits(hidden), hidden.float() @ head.float().T)
    assert torch.equal(Adapter(model).logits(hidden), (hidden @ head.T).float())


def test_a_bad_eval_dtype_is_refused_in_one_line():
    from mbs.config import EvalConfig

    with pytest.raises(ValueError, match=r"^eval.dtype='bf16' is not one of model, float32-head, float32$"):
        EvalConfig(dtype="bf16")
    assert EvalConfig().dtype == "float32-head"
