"""Work reused across jobs: the cached dense baseline (bit for bit, never stale) and ``engine.mode=cached`` (exactly the
non-sequential result computed directly)."""
import copy
import json

import pytest
import torch
from torch import nn

import mbs
from conftest import calibration, tiny
from mbs.cache import Cache
from mbs.compress.cached import BLOCK, LanguageStatistics, check_cached, compress_cached
from mbs.compress.pruning import Wanda
from mbs.compress.statistics import ColumnSquares
from mbs.data.calibration import SegmentSource, language_segments
from mbs.data.corpora import UDHRCorpus
from mbs.fingerprint import weights_fingerprint
from mbs.models.adapter import Adapter
from mbs.pipeline import run

TINY = ("model=tiny-llama", "logger=none", "progress=false", "sampler.segments=12", "eval.languages=[en,sw]",
        "analysis.layers=[0]", "analysis.segments=1", "analysis.statistic=mean_square")  # (centred ones need 3)


def run_in(tmp_path, name, *overrides):
    return run(mbs.compose(*TINY, *overrides), tmp_path / name)


def test_cached_dense_baseline_equals_a_fresh_evaluation_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv("MBS_CACHE", str(tmp_path / "cache"))
    first = run_in(tmp_path, "a")
    second = run_in(tmp_path, "b", "sampler=uniform")
    assert first["dense_baseline"]["perplexity"] == "computed" and first["dense_baseline"]["similarity"] == "computed"
    assert second["dense_baseline"]["perplexity"] == "cached" and second["dense_baseline"]["similarity"] == "cached"
    assert [r["dense_ppl"] for r in first["languages"]] == [r["dense_ppl"] for r in second["languages"]]
    for key in ("bytes", "dense_bpb"):  # the cache holds NLL and tokens; the bytes are the windows' own
        assert [r[key] for r in first["languages"]] == [r[key] for r in second["languages"]]
        assert all(r[key] for r in second["languages"])
    assert first["similarity"]["layers"]["0"]["matrix"] == second["similarity"]["layers"]["0"]["matrix"]
    # and both equal a fresh evaluation of the same weights on the same windows, not just each other
    prepared = mbs.pipeline.prepare(mbs.compose(*TINY))
    model = mbs.load(prepared.run.model)[1]
    fresh = mbs.perplexity(model, prepared.windows, batch_size=prepared.run.eval.batch_size,
                           chunk_tokens=prepared.run.eval.chunk_tokens)
    assert [r["dense_ppl"] for r in second["languages"]] == [fresh[k].perplexity for k in ("en", "sw")]
    assert [r["bytes"] for r in second["languages"]] == [sum(prepared.window_bytes[k]) for k in ("en", "sw")]
    assert json.loads((tmp_path / "b" / "results.json").read_text())["dense_baseline"]["perplexity"] == "cached"


@pytest.mark.parametrize("change", [("eval.max_windows=1",), ("seed=1",), ("model.dtype=bfloat16",),
                                    ("eval.languages=[en,yo]",), ("force=true",)])
def test_a_stale_baseline_is_never_used(tmp_path, monkeypatch, change):
    monkeypatch.setenv("MBS_CACHE", str(tmp_path / "cache"))
    base = run_in(tmp_path, "a")
    changed = run_in(tmp_path, "b", *change)
    assert changed["dense_baseline"]["perplexity"] == "computed"
    if change != ("force=true",):
        assert changed["dense_baseline"]["perplexity_entry"] != base["dense_baseline"]["perplexity_entry"]
    else:
        assert [r["dense_ppl"] for r in changed["languages"]] == [r["dense_ppl"] for r in base["languages"]]


def test_weights_fingerprint_sees_one_changed_weight():
    model = tiny("llama")
    before = weights_fingerprint(model)
    assert weights_fingerprint(tiny("llama")) == before
    Adapter(model).layers[1].mlp.down_proj.weight.data[3, 5] += 1e-6
    assert weights_fingerprint(model) != before


def test_a_larger_sample_extends_a_smaller_one(tokenizer):
    corpus = UDHRCorpus()
    small = language_segments(tokenizer, corpus, "en", 5, 32, 7, True)
    large = language_segments(tokenizer, corpus, "en", 37, 32, 7, True)
    assert torch.equal(large[:5], small)


def reference_squares(model, calibration_set) -> dict[int, torch.Tensor]:
    """Σx² per input channel of every Linear over the whole calibration set, in fp64, by plain forward hooks."""
    sums: dict[int, torch.Tensor] = {}

    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        sums[id(module)] = sums.get(id(module), 0) + (x * x).sum(0)

    handles = [m.register_forward_pre_hook(hook) for layer in Adapter(model).layers for m in layer.modules()
               if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for segments in calibration_set.segments.values():
            model.base_model(input_ids=segments, use_cache=False)
    for h in handles:
        h.remove()
    return sums


def test_cached_mode_is_exactly_the_direct_non_sequential_result(tokenizer, tmp_path):
    dense = tiny("llama")
    source = SegmentSource(tokenizer, UDHRCorpus(), 32, 0, True)
    store = Cache(tmp_path / "store")
    mixtures = [{"en": 3, "sw": 2, "fr": 3}, {"en": BLOCK + 3, "sw": 1}, {"en": 3, "sw": 2, "fr": 3}]
    loaded = []
    for counts in mixtures:
        cal = calibration(tokenizer, counts)
        cached, direct = copy.deepcopy(dense), copy.deepcopy(dense)
        statistics = LanguageStatistics(cached, source, weights_fingerprint(dense), store)
        compress_cached(cached, Wanda(sparsity=0.5), cal, statistics, progress=False)
        loaded.append((statistics.loaded, statistics.computed))
        # direct: the same statistics with nothing stored, then a plain fp64 reference of the mixture's Σx²
        compress_cached(direct, Wanda(sparsity=0.5), cal, LanguageStatistics(direct, source, "", None), progress=False)
        for a, b in zip(cached.parameters(), direct.parameters()):
            assert torch.equal(a, b)
        reference = reference_squares(dense, cal)
        by_hand = copy.deepcopy(dense)
        for layer in Adapter(by_hand).layers:
            for name, module in Adapter(by_hand).linears(layer).items():
                original = dict(dense.named_modules())[next(n for n, m in by_hand.named_modules() if m is module)]
                statistic = ColumnSquares(module.in_features, "cpu")
                statistic.sum = reference[id(original)].float()
                Wanda(sparsity=0.5).compress(name, module, statistic)
        for a, b in zip(cached.parameters(), by_hand.parameters()):
            assert torch.equal(a, b)
        sparsity = [float((m.weight == 0).float().mean()) for layer in Adapter(cached).layers
                    for m in Adapter(cached).linears(layer).values()]
        assert sparsity == [0.5] * len(sparsity)
    # blocks: en 1 + sw 1 + fr 1 computed; then en's second block; then everything from the store
    assert loaded == [(0, 3), (2, 1), (3, 0)]


def test_cached_statistics_of_other_weights_are_never_used(tokenizer, tmp_path):
    source = SegmentSource(tokenizer, UDHRCorpus(), 32, 0, True)
    store = Cache(tmp_path / "store")
    cal = calibration(tokenizer, {"en": 2})
    for seed, expect in ((0, (0, 1)), (1, (0, 1)), (0, (1, 0))):
        model = tiny("llama", seed=seed)
        statistics = LanguageStatistics(model, source, weights_fingerprint(model), store)
        compress_cached(model, Wanda(sparsity=0.5), cal, statistics, progress=False)
        assert (statistics.loaded, statistics.computed) == expect


@pytest.mark.parametrize("compressor, message", [(mbs.SparseGPT(), "'sparsegpt' needs Hessian"),
                                                  (mbs.GPTQ(), "'gptq' needs Hessian")])
def test_cached_mode_refuses_hessians_in_one_line(compressor, message):
    with pytest.raises(ValueError, match=message):
        check_cached(compressor, tiny("llama"))
    check_cached(Wanda(), tiny("llama"))


def test_a_pool_scales_each_language_mean_to_its_count(tokenizer, tmp_path):
    model = tiny("llama")
    source = SegmentSource(tokenizer, UDHRCorpus(), 32, 0, True)
    counts = {"en": 20, "sw": 3}
    pooled, _ = LanguageStatistics(model, source, "", None, pool=BLOCK).mixture(counts)
    exact = LanguageStatistics(model, source, "", None)
    en, sw = exact.segments("en", BLOCK), exact.segments("sw", 3)
    for key, value in pooled.items():
        expected = en[key].double().sum(0) * (20 / BLOCK) + sw[key].double().sum(0)
        assert torch.equal(value, expected.float())


@pytest.mark.parametrize("overrides, message", [
    (("engine.mode=cached", "compressor=gptq", "compressor.groupsize=32"), "engine.mode=cached keeps per-segment"),
    (("engine.mode=fast",), "engine.mode='fast' is not a mode; allowed: sequential, cached"),
    (("engine.mode=cached", "engine.statistics_pool=-1"), "engine.statistics_pool=-1 must be >= 0"),
])
def test_cached_mode_input_errors_come_before_the_model_loads(overrides, message):
    from mbs.pipeline import UserError, prepare

    with pytest.raises((UserError, ValueError), match=message):
        prepare(mbs.compose(*TINY, *overrides))


def test_a_cached_mode_run_records_its_mode_and_blocks(tmp_path, monkeypatch):
    monkeypatch.setenv("MBS_CACHE", str(tmp_path / "cache"))
    first = run_in(tmp_path, "a", "engine.mode=cached")
    again = run_in(tmp_path, "b", "engine.mode=cached")
    assert first["compression"]["mode"] == "cached" and first["compression"]["sparsity"] == 0.5
    assert first["compression"]["statistics_blocks"]["computed"] > 0
    assert again["compression"]["statistics_blocks"] == {"loaded": first["compression"]["statistics_blocks"]["computed"],
                                                         "computed": 0}
    assert [r["compressed_ppl"] for r in first["languages"]] == [r["compressed_ppl"] for r in again["languages"]]
