import pytest
import torch

from conftest import ARCHS, calibration, replay, tiny
from mbs.compress.engine import EngineConfig, capture, collect_statistics, compress_model, run_layer
from mbs.compress.pruning import Dense, Magnitude, Wanda
from mbs.compress.sparsegpt import SparseGPT
from mbs.models.adapter import Adapter


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_kwargs_replay_reproduces_logits_exactly(arch, tokenizer):
    model = tiny(arch)
    calib = calibration(tokenizer)
    adapter = Adapter(model)
    batches = calib.batches(4)
    captured, hidden = replay(adapter, batches)
    for (_, ids), h in zip(batches, hidden):
        replayed = adapter.logits(adapter.norm(h))
        assert torch.equal(replayed, logits(model, ids).float())
    if arch == "gemma3":  # sliding and global layers get different masks and rotary tables
        k0, k1 = captured.layer_kwargs[0][0], captured.layer_kwargs[1][0]
        assert not torch.equal(k0["position_embeddings"][0], k1["position_embeddings"][0])
        m0, m1 = k0["attention_mask"], k1["attention_mask"]
        assert m0 is not m1 and (m0 is None or m1 is None or not torch.equal(m0, m1))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("compressor", [Dense(), Wanda(sparsity=0.0), Magnitude(sparsity=0.0)])
def test_noop_leaves_logits_identical(arch, compressor, tokenizer):
    model = tiny(arch)
    ids = calibration(tokenizer).segments["en"]
    before = logits(model, ids)
    report = compress_model(model, compressor, calibration(tokenizer), EngineConfig(batch_size=2), progress=False)
    assert torch.equal(before, logits(model, ids))
    assert report.sparsity == 0.0


def prunable(model):
    adapter = Adapter(model)
    return {f"{i}.{n}": m.weight for i, layer in enumerate(adapter.layers) for n, m in adapter.linears(layer).items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_wanda_per_row_sparsity_is_exact(arch, sparsity, tokenizer):
    model = tiny(arch)
    embed = model.get_input_embeddings().weight.clone()
    report = compress_model(model, Wanda(sparsity=sparsity), calibration(tokenizer), EngineConfig(batch_size=2),
                            progress=False)
    for name, w in prunable(model).items():
        per_row = (w == 0).sum(dim=1)
        assert torch.all(per_row == int(w.shape[1] * sparsity)), name
    assert torch.equal(model.get_input_embeddings().weight, embed)  # embeddings and (tied) head untouched
    assert abs(report.sparsity - sparsity) < 0.02


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("cls", [Wanda, Magnitude])
def test_n_m_masks_valid(arch, n, m, cls, tokenizer):
    model = tiny(arch)
    compress_model(model, cls(sparsity=0.5, n=n, m=m), calibration(tokenizer), EngineConfig(), progress=False)
    for name, w in prunable(model).items():
        groups = (w == 0).reshape(w.shape[0], -1, m).sum(dim=2)
        assert torch.all(groups == n), name


def test_magnitude_is_one_threshold_per_matrix(tokenizer):
    model = tiny("llama")
    dense = {k: v.clone() for k, v in prunable(model).items()}
    compress_model(model, Magnitude(sparsity=0.5), calibration(tokenizer), EngineConfig(), progress=False)
    for name, w in prunable(model).items():
        assert int((w == 0).sum()) == int(w.numel() * 0.5)
        kept, pruned = dense[name][w != 0].abs(), dense[name][w == 0].abs()
        assert pruned.max() <= kept.min()


def test_wanda_keeps_what_matters_per_input_norm():
    """A column with a huge input norm survives even with small weights (it would not under magnitude)."""
    from mbs.compress.statistics import ColumnSquares

    lin = torch.nn.Linear(4, 2, bias=False)
    lin.weight.data = torch.tensor([[0.1, 1.0, 1.0, 1.0], [0.1, 1.0, 1.0, 1.0]])
    stat = ColumnSquares(4, "cpu")
    stat.update(torch.tensor([[100.0, 1.0, 1.0, 1.0]]))
    Wanda(sparsity=0.25).compress("l", lin, stat)
    assert torch.all(lin.weight[:, 0] == 0.1)
    assert torch.all((lin.weight == 0).sum(dim=1) == 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_next_layer_statistics_come_from_compressed_outputs(arch, tokenizer):
    torch.manual_seed(0)
    model = tiny(arch)
    calib = calibration(tokenizer)
    adapter = Adapter(model)
    dense_stats = {}

    def dense_hook(module, args):
        dense_stats.setdefault("x", []).append(args[0].reshape(-1, args[0].shape[-1]).float())

    first = next(iter(adapter.linears(adapter.layers[1]).items()))
    h = first[1].register_forward_pre_hook(dense_hook)
    for _, ids in calib.batches(4):
        model(input_ids=ids)
    h.remove()

    observed = {}
    compress_model(model, Wanda(sparsity=0.5), calib, EngineConfig(batch_size=4, per_language_statistics=True),
                   observer=lambda i, group, stats: observed.setdefault((i, group), {k: v.sum.clone() for k, v in stats.items()}),
                   progress=False)
    assert set(observed[(1, first[0])]) == {"en", "sw", "fr"}  # addressable by language
    engine_sum = sum(observed[(1, first[0])].values())

    # Layer 1's first Linear sees layer 0's compressed output through layer 1's (unchanged) norm: rerun the
    # compressed model and its inputs must match what the engine accumulated.
    after = {}
    h = first[1].register_forward_pre_hook(lambda m, a: after.setdefault("x", []).append(
        a[0].reshape(-1, a[0].shape[-1]).float()))
    for _, ids in calib.batches(4):
        model(input_ids=ids)
    h.remove()
    compressed_sum = torch.cat(after["x"]).square().sum(0)
    dense_sum = torch.cat(dense_stats["x"]).square().sum(0)
    torch.testing.assert_close(engine_sum, compressed_sum, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(engine_sum, dense_sum, rtol=1e-3)


def test_linears_with_one_input_share_one_statistic(tokenizer):
    model = tiny("llama")
    adapter = Adapter(model)
    calib = calibration(tokenizer)
    captured = capture(adapter, calib.batches(4), "cpu")
    stats, leader = collect_statistics(adapter.layers[0], adapter, Wanda(), captured.inputs,
                                       captured.layer_kwargs[0], captured.languages, per_language=False)
    assert leader["self_attn.k_proj"] == leader["self_attn.v_proj"] == "self_attn.q_proj"
    assert leader["mlp.up_proj"] == "mlp.gate_proj"
    assert leader["self_attn.o_proj"] == "self_attn.o_proj" and leader["mlp.down_proj"] == "mlp.down_proj"
    assert set(stats) == {"self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"}


def test_same_seed_same_masks(tokenizer):
    masks = []
    for _ in range(2):
        model = tiny("gemma3")
        compress_model(model, Wanda(sparsity=0.5), calibration(tokenizer, seed=3), EngineConfig(batch_size=3),
                       progress=False)
        masks.append({k: v == 0 for k, v in prunable(model).items()})
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_mixed_language_batches_are_full_and_keep_every_segment(tokenizer):
    calib = calibration(tokenizer)
    mixed = calib.batches(2, by_language=False)  # segments: en 3, sw 2, fr 3
    assert [b.shape[0] for _, b in mixed] == [2, 2, 2, 2]
    assert torch.equal(torch.cat([b for _, b in mixed]), torch.cat(list(calib.segments.values())))
    assert [b.shape[0] for _, b in calib.batches(2)] == [2, 1, 2, 2, 1]


@pytest.mark.parametrize("arch", ARCHS)
def test_statistics_forwards_stop_after_the_last_linear(arch, tokenizer):
    """Batches after the first stop at the last Linear call (its input is recorded, its matmul skipped); the
    statistics equal those of full forwards over the same inputs."""
    model = tiny(arch)
    adapter = Adapter(model)
    captured = capture(adapter, calibration(tokenizer).batches(2, by_language=False), "cpu")
    layer = adapter.layers[0]
    linears = adapter.linears(layer)
    last = list(linears)[-1]
    runs = []
    handle = linears[last].register_forward_hook(lambda *_: runs.append(1))
    try:
        stats, _ = collect_statistics(layer, adapter, Wanda(), captured.inputs, captured.layer_kwargs[0],
                                      captured.languages, per_language=False)
    finally:
        handle.remove()
    assert len(captured.inputs) > 1 and len(runs) == 1
    full = {name: torch.zeros(m.in_features) for name, m in linears.items()}

    def record(name):
        def pre_hook(module, args):
            full[name] += args[0].reshape(-1, args[0].shape[-1]).float().square().sum(0)

        return pre_hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in linears.items()]
    try:
        run_layer(layer, adapter, captured.inputs, captured.layer_kwargs[0])
    finally:
        for h in hooks:
            h.remove()
    for name, by_language in stats.items():
        torch.testing.assert_close(by_language["all"].sum, full[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [Wanda, SparseGPT])
def test_observer_statistics_stay_per_language_after_merging(cls, tokenizer):
    """What an observer keeps is each language's own statistic, untouched by the merge the compressor gets; the
    merged total is exactly the sum of the languages' statistics."""
    kept, snapshot, given = {}, {}, {}

    def observer(i, group, stats):
        kept[(i, group)] = stats
        snapshot[(i, group)] = {k: (v.sum.clone(), v.tokens) for k, v in stats.items()}

    class Recording(cls):
        def compress(self, name, module, statistic):
            given.setdefault(name, (statistic.sum.clone(), statistic.tokens))
            return super().compress(name, module, statistic)

    model = tiny("llama")
    compress_model(model, Recording(sparsity=0.5), calibration(tokenizer),
                   EngineConfig(batch_size=2, per_language_statistics=True), observer=observer, progress=False)
    for (i, group), stats in kept.items():
        assert set(stats) == {"en", "sw", "fr"}
        for language, statistic in stats.items():
            before_sum, before_tokens = snapshot[(i, group)][language]
            assert statistic.tokens == before_tokens and torch.equal(statistic.sum, before_sum), (i, group, language)
        if i == 0:
            total_sum, total_tokens = given[f"model.layers.0.{group}"]
            assert total_tokens == sum(s.tokens for s in stats.values())
            expected = torch.zeros_like(total_sum)
            for s in stats.values():
                expected += s.sum
            assert torch.equal(total_sum, expected)
