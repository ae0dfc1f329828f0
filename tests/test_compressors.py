import logging

import pytest
import torch
from torch import nn

from conftest import ARCHS, calibration, tiny
from transcriptions import Margin
from mbs.compress.engine import EngineConfig, compress_model
from mbs.compress import hessian
from mbs.compress.hessian import DAMP_RETRIES, inner_size, inverse_cholesky, inverse_upper_factor
from mbs.compress.masks import lowest_overall, lowest_per_row
from mbs.compress.pruning import Magnitude, Wanda
from mbs.compress.quantization import GPTQ, RTN
from mbs.compress.sparsegpt import SparseGPT
from mbs.compress.statistics import Hessian
from mbs.models.adapter import Adapter

D_IN, D_OUT, TOKENS = 64, 32, 512

PLAIN = dict(actorder=False, static_groups=False)  # GPTQ in the paper's column order, groups fitted during the sweep


@pytest.fixture(scope="module")
def layer_data():
    """A random Linear layer and correlated inputs X = Z·A (what makes the Hessian matter)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, D_IN, generator=g) @ torch.randn(D_IN, D_IN, generator=g)
    x = x * torch.linspace(0.2, 3.0, D_IN)  # uneven activity, so act-order permutes
    w = torch.randn(D_OUT, D_IN, generator=g)
    return w, x


def statistic_for(compressor, x):
    if not compressor.needs_statistics:
        return None
    stat = compressor.new_statistic(nn.Linear(x.shape[1], 1, bias=False))
    stat.update(x)
    return stat


def compressed(compressor, w, x, name="layer 0 test"):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    compressor.check(name, lin)
    compressor.compress(name, lin, statistic_for(compressor, x))
    return lin.weight.detach().clone()


def output_error(w_hat, w, x) -> float:
    return float(((w_hat - w) @ x.T).norm())


# ---------------------------------------------------------------- reconstruction quality on one layer


@pytest.mark.parametrize("n, m", [(0, 0), (2, 4)])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(layer_data, n, m):
    w, x = layer_data
    errors = {type(c).__name__: output_error(compressed(c, w, x), w, x)
              for c in (SparseGPT(n=n, m=m), Wanda(n=n, m=m), Magnitude(n=n, m=m))}
    assert errors["SparseGPT"] < errors["Wanda"] and errors["SparseGPT"] < errors["Magnitude"], errors


@pytest.mark.parametrize("bits, groupsize", [(4, -1), (3, 16), (2, 32)])
def test_gptq_reconstructs_better_than_rtn(layer_data, bits, groupsize):
    w, x = layer_data
    gptq = output_error(compressed(GPTQ(bits=bits, groupsize=groupsize, blocksize=16, **PLAIN), w, x), w, x)
    rtn = output_error(compressed(RTN(bits=bits, groupsize=groupsize), w, x), w, x)
    assert gptq < rtn


# ---------------------------------------------------------------- against a direct OBS loop


def direct_obs(w: torch.Tensor, h: torch.Tensor, target) -> torch.Tensor:
    """Textbook OBS on one row, non-lazy, fp64: for each column i in order, with H_F the Hessian of the columns not
    yet fixed (i and after), set w_i to target(i, w) and move the others by -(w_i - t)/[H_F⁻¹]_00 · [H_F⁻¹]_0,:."""
    w = w.double().clone()
    for i in range(w.numel()):
        hinv = torch.linalg.inv(h[i:, i:])
        t = target(i, w, h)
        w[i:] -= (w[i] - t) / hinv[0, 0] * hinv[0, :]
        w[i] = t
    return w


def obs_score(i: int, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return w[i] ** 2 / torch.linalg.inv(h[i:, i:])[0, 0]


@pytest.mark.parametrize("mode", ["unstructured", "2:4", "quantize"])
def test_sweep_matches_direct_obs_on_one_row(layer_data, mode):
    w_all, x = layer_data
    w = w_all[:1]
    percdamp = 0.5
    stat = Hessian(D_IN, "cpu")
    stat.update(x)
    h = (2 / TOKENS) * (x.double().T @ x.double())
    h += percdamp * h.diagonal().mean() * torch.eye(D_IN, dtype=torch.float64)
    margin = Margin()  # ours runs in fp32: every mask decision of the fp64 loop must be far from a tie

    if mode == "unstructured":  # one block = the whole row: the mask is chosen up front
        scores = torch.stack([obs_score(i, w[0].double(), h) for i in range(D_IN)])
        pruned = set(torch.sort(scores, stable=True).indices[: D_IN // 2].tolist())
        margin.cut(scores[None, :], D_IN // 2)

        def target(i, row, h):
            return 0.0 if i in pruned else row[i].item()

        compressor = SparseGPT(sparsity=0.5, percdamp=percdamp, blocksize=D_IN)
    elif mode == "2:4":  # each group of 4 chosen when reached, on the updated weights
        chosen: set[int] = set()

        def target(i, row, h):
            if i % 4 == 0:
                s = torch.stack([obs_score(i + k, row, h) for k in range(4)])
                margin.cut(s[None, :], 2)
                chosen.update(i + k for k in torch.sort(s, stable=True).indices[:2].tolist())
            return 0.0 if i in chosen else row[i].item()

        compressor = SparseGPT(sparsity=0.5, n=2, m=4, percdamp=percdamp, blocksize=D_IN)
    else:  # GPTQ: per-channel 4-bit grid fitted on the original row
        spec = GPTQ(bits=4, groupsize=-1).spec
        scale, zero = spec.fit(w.double())

        def target(i, row, h):
            margin.grid(row[i : i + 1], scale[0], zero[0], spec.maxq)
            return spec.quantize(row[i : i + 1], scale[0], zero[0]).item()

        compressor = GPTQ(bits=4, groupsize=-1, percdamp=percdamp, blocksize=D_IN, **PLAIN)

    expected = direct_obs(w[0], h, target)
    assert margin.value > 1e-4, f"a mask decision lies {margin.value:.1e} (relative) from its tie: not a valid case"
    got = compressed(compressor, w, x)[0].double()
    if mode != "quantize":
        assert torch.equal(got == 0, expected == 0)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_lazy_blocks_match_one_block(layer_data):
    """Lazy block updates are an exact reordering of the same arithmetic (up to rounding)."""
    w, x = layer_data
    a = compressed(SparseGPT(n=2, m=4, blocksize=8), w, x)
    b = compressed(SparseGPT(n=2, m=4, blocksize=D_IN), w, x)
    assert torch.equal(a == 0, b == 0)
    assert torch.allclose(a, b, atol=1e-4)


# ---------------------------------------------------------------- fast paths equal the plain ones


@pytest.mark.parametrize("ties", [False, True])
def test_selection_equals_a_stable_sort(ties):
    """kthvalue-based selection prunes exactly what a stable sort would (ties broken by index, lowest first)."""
    g = torch.Generator().manual_seed(1)
    score = torch.randint(0, 4, (37, 50), generator=g).float() if ties else torch.rand(37, 50, generator=g)
    for sparsity in (0.0, 0.3, 0.5, 0.9):
        k = int(50 * sparsity)
        per_row = torch.zeros_like(score, dtype=torch.bool)
        per_row.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], True)
        assert torch.equal(lowest_per_row(score, sparsity), per_row)
        k = int(score.numel() * sparsity)
        overall = torch.zeros(score.numel(), dtype=torch.bool)
        overall[torch.sort(score.flatten(), stable=True).indices[:k]] = True
        assert torch.equal(lowest_overall(score, sparsity), overall.view_as(score))


def test_inner_size_keeps_look_ahead_spans_whole():
    assert inner_size(128) == inner_size(128, (4,)) == inner_size(128, (16,)) == inner_size(128, (1024,)) == 32
    assert inner_size(128, (48,)) == 128  # a group of 48 would straddle sub-blocks of 32: one level only
    assert inner_size(48, ()) == 48  # blocks not made of whole sub-blocks


@pytest.mark.parametrize("make, inner", [
    (lambda: SparseGPT(sparsity=0.5, blocksize=64), 32),
    (lambda: SparseGPT(n=2, m=4, blocksize=64), 32),
    (lambda: SparseGPT(sparsity=0.5, bits=4, groupsize=16, blocksize=64), 32),
    (lambda: GPTQ(bits=3, groupsize=16, blocksize=64, **PLAIN), 32),  # groups inside a sub-block
    (lambda: GPTQ(bits=3, groupsize=64, blocksize=64, **PLAIN), 16),  # groups spanning sub-blocks, fitted at start
    (lambda: GPTQ(bits=3, groupsize=16, blocksize=48, **PLAIN), 24),  # groups would straddle sub-blocks: one level
    (lambda: GPTQ(bits=3, groupsize=16, blocksize=64, actorder=True, static_groups=False), 32),
])
def test_two_level_sweep_matches_the_column_by_column_sweep(layer_data, make, inner, monkeypatch):
    w, x = layer_data
    monkeypatch.setattr(hessian, "INNER", inner)
    fast = compressed(make(), w, x)
    monkeypatch.setattr(hessian, "INNER", 10**6)  # one level: each column updates the rest of its block
    plain = compressed(make(), w, x)
    assert torch.equal(fast == 0, plain == 0)
    assert torch.allclose(fast, plain, atol=1e-4), (fast - plain).abs().max()


def test_hessian_upper_blocks_give_the_full_symmetric_product():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 300, generator=g)  # 300 columns: bands of 128, 128, 44 rows
    stat = Hessian(300, "cpu")
    stat.update(x[:120])
    stat.update(x[120:])
    exact = (2 / 200) * x.double().T @ x.double()
    matrix = stat.matrix
    assert torch.equal(matrix, matrix.T)
    assert torch.allclose(matrix.double(), exact, atol=1e-5 * float(exact.abs().max()))


def test_inverse_upper_factor_is_the_upper_cholesky_factor_of_the_inverse(layer_data):
    _, x = layer_data
    h = (2 / TOKENS) * x.T @ x
    h.diagonal().add_(0.01 * float(h.diagonal().mean()))
    u = inverse_upper_factor(h)
    assert torch.equal(u, u.triu()) and bool((u.diagonal() > 0).all())
    classic = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    assert torch.allclose(u, classic, rtol=1e-3, atol=1e-5 * float(classic.abs().max()))
    identity = (u.double().T @ u.double()) @ h.double()
    assert torch.allclose(identity, torch.eye(D_IN, dtype=torch.float64), atol=1e-3)
    assert inverse_upper_factor(-torch.eye(4)) is None


# ---------------------------------------------------------------- exact patterns and grids


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_sparsegpt_unstructured_sparsity_is_exact_per_block(layer_data, sparsity):
    w, x = layer_data
    blocksize = 24  # 64 columns: blocks of 24, 24, 16
    out = compressed(SparseGPT(sparsity=sparsity, blocksize=blocksize), w, x)
    for start in range(0, D_IN, blocksize):
        block = out[:, start : start + blocksize]
        assert int((block == 0).sum()) == int(block.numel() * sparsity)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_sparsegpt_n_m_pattern(layer_data, n, m):
    w, x = layer_data
    out = compressed(SparseGPT(n=n, m=m, blocksize=16), w, x)
    assert torch.all((out == 0).reshape(D_OUT, -1, m).sum(dim=2) == n)


def on_grid(w: torch.Tensor, grids: dict, maxq: int) -> bool:
    """Every weight is an integer level in [0, maxq] of the grid of its column's group (by g_idx)."""
    g = grids["g_idx"].long()
    scale, zero = grids["scale"][:, g], grids["zero"][:, g]
    q = w / scale + zero
    return bool(torch.allclose(q, q.round(), atol=1e-3) and q.round().min() >= 0 and q.round().max() <= maxq)


@pytest.mark.parametrize("compressor", [RTN(bits=3, groupsize=16), GPTQ(bits=3, groupsize=16, blocksize=16, **PLAIN),
                                        GPTQ(bits=2, groupsize=-1, sym=True, **PLAIN), RTN(bits=4, sym=True),
                                        SparseGPT(bits=4, groupsize=16, blocksize=16)])
def test_quantized_weights_have_at_most_2_bits_levels_per_group(layer_data, compressor):
    w, x = layer_data
    out = compressed(compressor, w, x)
    width = compressor.groupsize if compressor.groupsize > 0 else D_IN
    levels = torch.stack([torch.unique(out[r, c : c + width]).numel() * torch.ones(())
                          for r in range(D_OUT) for c in range(0, D_IN, width)])
    assert levels.max() <= 2**compressor.bits
    assert on_grid(out, compressor.records["layer 0 test"], 2**compressor.bits - 1)


def test_joint_sparsegpt_keeps_the_mask_and_quantizes_kept_weights(layer_data):
    w, x = layer_data
    out = compressed(SparseGPT(sparsity=0.5, bits=4, blocksize=16), w, x)
    assert (out == 0).float().mean() >= 0.5
    assert torch.unique(out, dim=None).numel() <= D_OUT * 2**4


def test_act_order_with_static_groups_keeps_the_unpermuted_grouping(layer_data):
    w, x = layer_data
    static = GPTQ(bits=3, groupsize=16, actorder=True, static_groups=True, blocksize=16)
    out = compressed(static, w, x)
    grids = static.records["layer 0 test"]
    assert torch.equal(grids["g_idx"].long(), torch.arange(D_IN) // 16)
    assert on_grid(out, grids, 7)
    # without static groups act-order groups columns in permuted order: a different grouping, still on its grids
    dynamic = GPTQ(bits=3, groupsize=16, actorder=True, static_groups=False, blocksize=16)
    out = compressed(dynamic, w, x)
    grids = dynamic.records["layer 0 test"]
    assert not torch.equal(grids["g_idx"].long(), torch.arange(D_IN) // 16)
    assert on_grid(out, grids, 7)


# ---------------------------------------------------------------- config checks


@pytest.mark.parametrize("make", [
    lambda: GPTQ(bits=1), lambda: GPTQ(bits=9), lambda: RTN(bits=16), lambda: GPTQ(percdamp=0.0),
    lambda: GPTQ(blocksize=0), lambda: RTN(groupsize=0), lambda: GPTQ(groupsize=-2),
    lambda: SparseGPT(n=4, m=4), lambda: SparseGPT(n=1, m=4), lambda: SparseGPT(bits=1),
    lambda: SparseGPT(percdamp=-1.0), lambda: SparseGPT(blocksize=0), lambda: SparseGPT(n=4, m=8, blocksize=12),
])
def test_bad_config_fails_at_construction(make):
    with pytest.raises(ValueError, match="compressor"):
        make()


def test_bad_config_fails_at_hydra_build():
    from hydra import compose, initialize_config_dir

    from mbs.config import build, register

    register()
    import os

    with initialize_config_dir(config_dir=os.path.abspath("conf"), version_base="1.3"):
        cfg = compose("config", overrides=["compressor=gptq", "compressor.bits=9", "logger=none"])
        with pytest.raises(ValueError, match="bits=9"):
            build(cfg)
        cfg = compose("config", overrides=["compressor=sparsegpt", "compressor.n=2", "compressor.m=4",
                                           "logger=none"])
        assert build(cfg).compressor.structured


def test_groupsize_not_dividing_the_width_fails_before_any_work(tokenizer):
    model = tiny("llama")  # in_features 64 and 128
    with pytest.raises(ValueError, match=r"layers\.0\..*groupsize=48 does not divide in_features=64"):
        compress_model(model, GPTQ(groupsize=48), calibration(tokenizer), EngineConfig(), progress=False)


# ---------------------------------------------------------------- Hessian statistic and preparation


def test_hessian_merge_combines_counts(layer_data):
    _, x = layer_data
    whole, a, b = Hessian(D_IN, "cpu"), Hessian(D_IN, "cpu"), Hessian(D_IN, "cpu")
    whole.update(x)
    a.update(x[:100])
    b.update(x[100:])
    a.merge(b)
    assert a.tokens == TOKENS
    exact = (2 / TOKENS) * x.double().T @ x.double()
    tol = 1e-5 * float(exact.abs().max())
    assert torch.allclose(a.matrix.double(), exact, atol=tol)
    assert torch.allclose(whole.matrix.double(), exact, atol=tol)
    half = Hessian(D_IN, "cpu")  # counts matter: merging equal halves must not double the scale
    half.update(x[:256])
    other = Hessian(D_IN, "cpu")
    other.update(x[:256])
    half.merge(other)
    assert torch.allclose(half.matrix.double(), (2 / 256) * x[:256].double().T @ x[:256].double(), atol=tol)


def test_cholesky_failure_raises_damping_with_a_warning_then_raises(caplog):
    h = torch.diag(torch.tensor([1.0, 1.0, -0.05]))  # mean diag 0.65: 0.01 fails, 0.1 works
    with caplog.at_level(logging.WARNING, logger="mbs.compress.hessian"):
        upper, used = inverse_cholesky(h, 0.01, "layer 3 mlp.down_proj")
    assert used == pytest.approx(0.1)
    assert "layer 3 mlp.down_proj" in caplog.text and "percdamp=0.01" in caplog.text
    assert torch.allclose(upper.T @ upper, torch.linalg.inv(h + 0.1 * 0.65 * torch.eye(3)), atol=1e-5)
    with pytest.raises(RuntimeError, match="layer 3 mlp.down_proj"):
        inverse_cholesky(torch.diag(torch.tensor([1.0, 1.0, -1e6])), 0.01, "layer 3 mlp.down_proj")
    assert caplog.text.count("retrying") >= DAMP_RETRIES


def test_dead_inputs_are_zeroed_and_stay_finite(layer_data):
    w, x = layer_data
    x = x.clone()
    x[:, 5] = 0.0
    out = compressed(SparseGPT(sparsity=0.5, blocksize=16), w, x)
    assert torch.all(out[:, 5] == 0) and torch.isfinite(out).all()
    out = compressed(GPTQ(bits=4, groupsize=-1, blocksize=16, **PLAIN), w, x)
    assert torch.all(out[:, 5] == 0) and torch.isfinite(out).all()


class CountingSparseGPT(SparseGPT):
    """Counts Hessians made and checks that compress() leaves the (shared) statistic untouched."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.made = 0

    def new_statistic(self, module):
        self.made += 1
        return super().new_statistic(module)

    def compress(self, name, module, statistic):
        before = statistic.sum.clone(), statistic.tokens
        out = super().compress(name, module, statistic)
        assert torch.equal(statistic.sum, before[0]) and statistic.tokens == before[1], name
        return out


def test_q_k_v_and_gate_up_share_one_hessian(tokenizer):
    model = tiny("llama")
    compressor = CountingSparseGPT(sparsity=0.5)
    report = compress_model(model, compressor, calibration(tokenizer), EngineConfig(batch_size=4), progress=False)
    layers = len(Adapter(model).layers)
    assert compressor.made == 4 * layers  # {q,k,v}, o, {gate,up}, down
    shared = report.layers[0]["shared_inputs"]
    assert shared["self_attn.k_proj"] == shared["self_attn.v_proj"] == "self_attn.q_proj"
    assert shared["mlp.up_proj"] == "mlp.gate_proj"


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_sparsegpt_and_gptq_on_tiny_models(arch, tokenizer):
    model = tiny(arch)
    calib = calibration(tokenizer)
    report = compress_model(model, SparseGPT(n=2, m=4), calib, EngineConfig(batch_size=4), progress=False)
    for layer in Adapter(model).layers:
        for name, module in Adapter(model).linears(layer).items():
            w = module.weight
            assert torch.all((w == 0).reshape(w.shape[0], -1, 4).sum(dim=2) == 2), name
    assert report.sparsity == pytest.approx(0.5)
    gptq = GPTQ(bits=4, groupsize=32, **PLAIN)
    report = compress_model(tiny(arch), gptq, calib, EngineConfig(batch_size=4), progress=False)
    assert report.layers[0]["modules"]
    assert all(m["bits"] == 4 and m["groupsize"] == 32 for layer in report.layers for m in layer["modules"].values())
    assert len(gptq.records) == sum(len(layer["modules"]) for layer in report.layers)
