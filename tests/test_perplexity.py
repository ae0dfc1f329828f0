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
