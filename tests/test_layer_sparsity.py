"""Non-uniform layer sparsity (``compressor.layer_sparsity=owl``, mbs/compress/profile.py): OWL's formulas on a
hand-made layer, the exact global sparsity under every profile and pruner in both pipelines, and the one-line refusals
before the model loads."""
import copy
import math

import pytest
import torch

import mbs
from conftest import calibration, tiny
from mbs.compress.cached import LanguageStatistics, compress_cached
from mbs.compress.engine import EngineConfig, compress_model
from mbs.compress.masks import (lowest_count, lowest_overall, lowest_per_row, lowest_per_row_counts, row_counts)
from mbs.compress.profile import outlier_ratio, owl_sparsities, split, zero_budgets
from mbs.compress.pruning import Magnitude, Wanda
from mbs.compress.sparsegpt import SparseGPT
from mbs.data.calibration import SegmentSource
from mbs.data.corpora import UDHRCorpus
from mbs.models.adapter import Adapter

TINY = ("model=tiny-llama", "logger=none", "progress=false", "sampler.segments=12", "eval.languages=[en,sw]")


def test_outlier_ratio_of_a_hand_made_layer():
    # two matrices of one layer: Wanda scores |W|·||X|| = [[1, 4], [0.5, 8]] and [[3, 1]]; mean 17.5/6 ≈ 2.917
    pruner = Wanda(layer_sparsity="owl", owl_m=2.0)
    weights = {"a": torch.tensor([[1.0, -2.0], [0.5, 4.0]]), "b": torch.tensor([[3.0, -1.0]])}
    norms = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([1.0, 1.0])}
    assert pruner.layer_figure(weights, norms) == pytest.approx(1 / 6)  # > 5.83: only 8
    assert outlier_ratio([torch.tensor([[1.0, 4.0], [0.5, 8.0]]), torch.tensor([[3.0, 1.0]])], 1.0) == 0.5  # 4, 8, 3


def test_owl_sparsities_by_hand():
    # D = [0.1, 0.2, 0.3] -> x = 2λ(D - min)/(max - min) = [0, 0.1, 0.2]; S_l = S - (x_l - mean x)
    assert owl_sparsities([0.1, 0.2, 0.3], [1, 1, 1], 0.5, 0.1) == pytest.approx([0.6, 0.5, 0.4])
    # unequal layers: the mean of x is weighted by parameters (0.5/4 = 0.125), so Σ S_l·P_l = S·P
    targets = owl_sparsities([0.1, 0.2, 0.3], [1, 1, 2], 0.5, 0.1)
    assert targets == pytest.approx([0.625, 0.525, 0.425])
    assert sum(s * p for s, p in zip(targets, [1, 1, 2])) == pytest.approx(0.5 * 4)
    assert owl_sparsities([0.2, 0.2], [5, 7], 0.7, 0.08) == [0.7, 0.7]  # no spread: uniform


def test_split_and_budgets_are_exact():
    assert split(10, [1, 1, 1]) == [3, 4, 3]
    assert split(7, [0, 2, 0]) == [0, 7, 0]
    for total, weights in [(77414, [0.8, 0.65, 0.64]), (1, [0.3] * 7), (0, [1, 2])]:
        parts = split(total, weights)
        assert sum(parts) == total
        assert all(abs(p - total * w / sum(weights)) <= 1 for p, w in zip(parts, weights))
    modules = [{"l0.a": 6, "l0.b": 10}, {"l1.a": 6, "l1.b": 10}]
    budgets = zero_budgets([0.6, 0.4], modules, 0.5)
    assert sum(budgets.values()) == 16 and budgets["l0.a"] + budgets["l0.b"] == 10


def test_count_masks_match_the_fraction_masks():
    score = torch.randint(0, 5, (6, 16)).float()  # many ties: both break them as a stable sort does
    assert torch.equal(lowest_per_row_counts(score, row_counts(6 * 7, 6)), lowest_per_row(score, 7 / 16))
    assert torch.equal(lowest_count(score, 40), lowest_overall(score, 40 / 96))
    counts = row_counts(13, 6)
    assert counts.tolist() == [3, 2, 2, 2, 2, 2]
    assert lowest_per_row_counts(score, counts).sum(1).tolist() == counts.tolist()


def params_of(model):
    adapter = Adapter(model)
    return sum(m.weight.numel() for layer in adapter.layers for m in adapter.linears(layer).values())


@pytest.mark.parametrize("make", [
    lambda s, p: Magnitude(sparsity=s, layer_sparsity=p),
    lambda s, p: Wanda(sparsity=s, layer_sparsity=p),
    lambda s, p: SparseGPT(sparsity=s, layer_sparsity=p, blocksize=32),
])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_global_sparsity_is_exact_under_owl_in_the_sequential_engine(tokenizer, make, sparsity):
    model = tiny("llama")
    report = compress_model(model, make(sparsity, "owl"), calibration(tokenizer), EngineConfig(batch_size=4),
                            progress=False)
    params = params_of(model)
    assert report.params == params and report.zeros == math.floor(sparsity * params + 0.5)
    profile = report.profile
    assert profile["target_zeros"] == report.zeros and len(profile["target_sparsities"]) == len(report.layers)
    assert max(profile["target_sparsities"]) - min(profile["target_sparsities"]) == pytest.approx(2 * 0.08)
    for layer, target in zip(report.layers, profile["target_sparsities"]):  # each layer at its target, to a weight
        params_l = sum(m["params"] for m in layer["modules"].values())
        assert abs(layer["sparsity"] - target) <= 1.5 / params_l
    assert len({round(layer["sparsity"], 3) for layer in report.layers}) > 1  # really not uniform


def test_uniform_profile_is_the_plain_pruner(tokenizer):
    cal = calibration(tokenizer)
    a, b = tiny("llama"), tiny("llama")
    compress_model(a, Wanda(sparsity=0.5), cal, EngineConfig(batch_size=4), progress=False)
    report = compress_model(b, Wanda(sparsity=0.5, layer_sparsity="uniform"), cal, EngineConfig(batch_size=4),
                            progress=False)
    assert report.profile is None
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_owl_profile_of_the_dense_model_is_the_same_sequential_and_cached(tokenizer):
    dense = tiny("llama")
    cal = calibration(tokenizer)
    sequential = compress_model(copy.deepcopy(dense), Wanda(sparsity=0.5, layer_sparsity="owl"), cal,
                                EngineConfig(batch_size=4), progress=False)
    model = copy.deepcopy(dense)
    source = SegmentSource(tokenizer, UDHRCorpus(), 32, 0, True)
    cached = compress_cached(model, Magnitude(sparsity=0.5, layer_sparsity="owl"), cal,
                             LanguageStatistics(model, source, "", None), progress=False)
    # both are the dense model's statistics of the same segments, summed in another order: a score on the threshold
    # could flip, so allow a few weights' worth (1/numel each) of the outlier ratios
    width = min(sum(m["params"] for m in layer["modules"].values()) for layer in cached.layers)
    assert cached.profile["outlier_ratios"] == pytest.approx(sequential.profile["outlier_ratios"], abs=4 / width)
    assert cached.zeros == math.floor(0.5 * params_of(model) + 0.5)


@pytest.mark.parametrize("overrides, message", [
    (("compressor.layer_sparsity=owl", "compressor.owl_lambda=-0.1"), "compressor.owl_lambda=-0.1 must be >= 0"),
    (("compressor.owl_m=0",), "compressor.owl_m=0.0 must be > 0"),
    (("compressor=sparsegpt", "compressor.owl_m=-1"), "compressor.owl_m=-1.0 must be > 0"),
    (("compressor.layer_sparsity=owl", "compressor.n=2", "compressor.m=4"),
     "compressor.layer_sparsity=owl cannot apply to N:M=2:4"),
    (("compressor=magnitude", "compressor.layer_sparsity=owl", "compressor.n=4", "compressor.m=8"),
     "cannot apply to N:M=4:8"),
    (("compressor.layer_sparsity=lod",), "compressor.layer_sparsity='lod' is not a profile; allowed: uniform, owl"),
    (("compressor.layer_sparsity=owl", "compressor.sparsity=0.95"), "would put layer sparsities outside"),
    (("model=tiny-mixtral", "compressor.layer_sparsity=owl"), "routes tokens to experts"),
])
def test_bad_profiles_fail_in_one_line_before_the_model_loads(overrides, message, monkeypatch):
    from mbs import pipeline
    from mbs.pipeline import UserError, prepare

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"), raising=False)
    with pytest.raises((UserError, ValueError), match=message) as err:
        prepare(mbs.compose(*TINY, *overrides))
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ("compressor=wanda",),
    ("compressor=magnitude", "engine.mode=cached", "compressor.sparsity=0.7"),
    ("compressor=sparsegpt", "compressor.blocksize=32", "compressor.owl_lambda=0.05"),
])
def test_a_run_records_the_profile_and_the_exact_sparsity(tmp_path, monkeypatch, overrides):
    from mbs.pipeline import run

    monkeypatch.setenv("MBS_CACHE", str(tmp_path / "cache"))
    results = run(mbs.compose(*TINY, "analysis.layers=[]", "compressor.layer_sparsity=owl", *overrides), tmp_path / "r")
    c = results["compression"]
    sparsity = results["config"]["compressor"]["sparsity"]
    assert c["zeros"] == math.floor(sparsity * c["params"] + 0.5) and c["sparsity"] == c["zeros"] / c["params"]
    profile = c["layer_profile"]
    assert profile["layer_sparsity"] == "owl" and profile["target_zeros"] == c["zeros"]
    assert profile["owl_m"] == 5.0 and len(profile["outlier_ratios"]) == len(c["layers"])
    spread = max(profile["target_sparsities"]) - min(profile["target_sparsities"])
    assert spread == pytest.approx(2 * results["config"]["compressor"]["owl_lambda"])
    assert all(r["compressed_ppl"] > 0 for r in results["languages"])
