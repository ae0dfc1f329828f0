"""SparseGPT against a straight transcription of the reference (IST-DASLab/sparsegpt, ``SparseGPT.fasterprune``;
tests/transcriptions.py) on one multi-row layer: unstructured (mask chosen per 128-column block over all rows), N:M
(each group chosen when the sweep reaches it, on the updated weights) and joint 4-bit quantization.

The project keeps exactly k = int(rows·block·sparsity) weights pruned per block where the published rule
(``tmp <= sorted[k]``) prunes k+1; the comparison uses the transcription with the exact-k rule, and a separate test
shows the published rule prunes k+1. Both sides run in float64 on a float64 Hessian; every comparison first asserts
that no decision of the reference lies within TIE_MARGIN of its tie (see tests/transcriptions.py), then that the
masks are identical and the weights agree to 1e-9 of their scale.
"""
import pytest
import torch
from torch import nn

from mbs.compress.sparsegpt import SparseGPT
from mbs.compress.statistics import Hessian
from transcriptions import TIE_MARGIN, Margin, fasterprune

ROWS, COLS, TOKENS, BLOCK = 32, 512, 1024, 128
TOLERANCE = 1e-9


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, Hessian, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(TOKENS, COLS, generator=g, dtype=torch.float64)
    x = x @ torch.randn(COLS, COLS, generator=g, dtype=torch.float64) / COLS**0.5
    x = x * torch.linspace(0.2, 3.0, COLS, dtype=torch.float64)
    statistic = Hessian(COLS, "cpu")
    statistic.sum = statistic.sum.double()  # float64 statistic: the same H to ~1e-16 on every machine
    statistic.update(x)
    return torch.randn(ROWS, COLS, generator=g, dtype=torch.float64), statistic, statistic.matrix


def ours(w: torch.Tensor, statistic: Hessian, **config) -> torch.Tensor:
    linear = nn.Linear(COLS, ROWS, bias=False, dtype=torch.float64)
    linear.weight.data.copy_(w)
    compressor = SparseGPT(blocksize=BLOCK, **config)
    compressor.check("layer", linear)
    compressor.compress("layer", linear, statistic)
    return linear.weight.detach()


def reference(w: torch.Tensor, h: torch.Tensor, **config) -> torch.Tensor:
    margin = Margin()
    out = fasterprune(w, h, blocksize=BLOCK, margin=margin, **config)
    assert margin.value > TIE_MARGIN, f"a decision lies {margin.value:.1e} from its tie: not a valid case"
    return out


def loss(q: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    delta = q - w
    return float(torch.trace(delta @ h @ delta.T))


CASES = {
    "unstructured 50%": (dict(sparsity=0.5), dict(sparsity=0.5)),
    "unstructured 70%": (dict(sparsity=0.7), dict(sparsity=0.7)),
    "2:4": (dict(n=2, m=4), dict(sparsity=0.5, prunen=2, prunem=4)),
    "4:8": (dict(n=4, m=8), dict(sparsity=0.5, prunen=4, prunem=8)),
    "50% + 4-bit": (dict(sparsity=0.5, bits=4), dict(sparsity=0.5, bits=4)),
    "2:4 + 4-bit": (dict(n=2, m=4, bits=4), dict(sparsity=0.5, prunen=2, prunem=4, bits=4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sparsegpt_equals_the_reference(layer, case):
    w, statistic, h = layer
    mine_config, reference_config = CASES[case]
    mine, expected = ours(w, statistic, **mine_config), reference(w, h, **reference_config)
    assert torch.equal(mine == 0, expected == 0)
    assert float((mine - expected).abs().max()) <= TOLERANCE * float(w.abs().max())
    assert loss(mine, w, h) == pytest.approx(loss(expected, w, h), rel=TOLERANCE)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_the_published_rule_prunes_k_plus_one_per_block(layer, sparsity):
    """``tmp <= sorted[k]`` (the published code) prunes the k+1 lowest scores of each block (no ties here), the
    exact-k rule k; and that one weight per block moves the loss far past the comparison's tolerance (its teeth)."""
    w, statistic, h = layer
    k = int(ROWS * BLOCK * sparsity)
    published = reference(w, h, sparsity=sparsity, exact_k=False)
    exact = reference(w, h, sparsity=sparsity)
    mine = ours(w, statistic, sparsity=sparsity)
    for start in range(0, COLS, BLOCK):
        assert int((published[:, start : start + BLOCK] == 0).sum()) == k + 1
        assert int((exact[:, start : start + BLOCK] == 0).sum()) == k
        assert int((mine[:, start : start + BLOCK] == 0).sum()) == k
    assert abs(loss(published, w, h) / loss(mine, w, h) - 1) > 1000 * TOLERANCE
