"""The damage predictor (mbs/analyze/damage.py) against a direct computation with forward hooks."""
import copy

import pytest
import torch
from torch import nn

from conftest import tiny
from mbs.analyze.damage import DamagePredictor, RiskConfig, aggregate, spearman_or_none, unsupported
from mbs.compress.cached import LanguageStatistics
from mbs.compress.pruning import Magnitude, Wanda
from mbs.compress.quantization import GPTQ, RTN
from mbs.compress.sparsegpt import SparseGPT
from mbs.compress.statistics import ColumnSquares
from mbs.data.calibration import SegmentSource
from mbs.data.corpora import UDHRCorpus
from mbs.models.adapter import Adapter

SEQLEN, POOL = 32, 4


def hooked_sums(model: nn.Module, segments: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Σx² of every decoder-layer Linear's input over ``segments``, one forward per segment, from forward hooks on
    the modules themselves (no engine code)."""
    adapter = Adapter(model)
    sums: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(adapter.layers):
        for name, module in adapter.linears(layer).items():
            def hook(_, args, key=(i, name)):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + (x * x).sum(0)
            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for segment in segments:
                model(input_ids=segment[None])
    finally:
        for h in handles:
            h.remove()
    return sums


def direct_errors(model, compressor, source, counts, targets):
    """The same quantity computed directly: compress a copy from the hooked mixture sums, weigh ΔW by each target's
    hooked sums."""
    mixture: dict = {}
    for language, count in counts.items():
        used = min(count, POOL)
        for key, value in hooked_sums(model, source.segments(language, used)).items():
            mixture[key] = mixture.get(key, 0) + value * (count / used)
    compressed = copy.deepcopy(model)
    adapter, dense = Adapter(compressed), Adapter(model)
    tokens = sum(counts.values()) * SEQLEN
    for i, layer in enumerate(adapter.layers):
        for name, module in adapter.linears(layer).items():
            compressor.compress(name, module, ColumnSquares.from_sum(mixture[i, name].float(), tokens))
    errors = {}
    for language in targets:
        s = hooked_sums(model, source.segments(language, POOL))
        errors[language] = []
        for i, (layer, dense_layer) in enumerate(zip(adapter.layers, dense.layers)):
            per_matrix = []
            for name, module in adapter.linears(layer).items():
                w = dense.linears(dense_layer)[name].weight.double()
                dw = module.weight.double() - w
                per_matrix.append(float((dw.square().sum(0) @ s[i, name]) / (w.square().sum(0) @ s[i, name])))
            errors[language].append(sum(per_matrix) / len(per_matrix))
    return errors


@pytest.mark.parametrize("compressor", [Wanda(sparsity=0.5), Magnitude(sparsity=0.5), RTN(bits=4)],
                         ids=["wanda", "magnitude", "rtn"])
def test_per_layer_error_equals_a_direct_computation_with_hooks(tokenizer, compressor):
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source = SegmentSource(tokenizer, UDHRCorpus(), SEQLEN, 0, True)
    counts = {"en": 6, "sw": 2}  # en above the pool: its first POOL segments scaled by 6/4
    predictor = DamagePredictor(model, compressor, LanguageStatistics(model, source, "", None, pool=POOL),
                                ["fr", "sw", "yo"], POOL)
    got = predictor.assess(counts).per_layer
    want = direct_errors(model, compressor, source, counts, ["fr", "sw", "yo"])
    assert set(got) == {"fr", "sw", "yo"}
    for language in want:
        assert len(got[language]) == len(Adapter(model).layers)
        assert got[language] == pytest.approx(want[language], rel=1e-4)
        assert all(e > 0 for e in got[language])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # weights put back
    assert aggregate(got)["sw"] == pytest.approx(sum(got["sw"]) / len(got["sw"]))


def test_the_mixture_changes_the_prediction_of_wanda_and_not_of_magnitude(tokenizer):
    model = tiny("llama")
    source = SegmentSource(tokenizer, UDHRCorpus(), SEQLEN, 0, True)
    english, swahili = {"en": 4}, {"sw": 4}
    wanda = DamagePredictor(model, Wanda(sparsity=0.5), LanguageStatistics(model, source, "", None, pool=POOL),
                            ["en", "sw"], POOL)
    assert wanda.assess(english).output_error != wanda.assess(swahili).output_error
    assert wanda.predict(english) != wanda.predict(swahili)
    magnitude = DamagePredictor(model, Magnitude(sparsity=0.5), LanguageStatistics(model, source, "", None,
                                                                                   pool=POOL), ["en", "sw"], POOL)
    assert magnitude.assess(english).output_error == magnitude.assess(swahili).output_error
    assert magnitude.predict(english) == magnitude.predict(swahili)


class CalibrationOnly(UDHRCorpus):
    """The UDHR corpus, refusing to hand out any split but the calibration one."""

    def texts(self, language, split):
        assert split == "calibration", f"the prediction read the {split} split of {language}"
        return super().texts(language, split)


def probe_nll(model: nn.Module, segments: torch.Tensor) -> float:
    """Mean next-token NLL over ``segments`` by the model's own loss (no MBS evaluation code)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for segment in segments:
            loss = model(input_ids=segment[None], labels=segment[None]).loss
            total += float(loss) * (segment.numel() - 1)
            count += segment.numel() - 1
    return total / count


@pytest.mark.parametrize("compressor", [Wanda(sparsity=0.5), RTN(bits=3)], ids=["wanda", "rtn"])
def test_predicted_damage_is_the_log_ratio_on_later_calibration_segments(tokenizer, compressor):
    """The predicted damage equals the log ratio, computed directly, of a copy compressed from hooked mixture sums
    on the probe segments: the calibration segments after the ones the statistics hold."""
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source = SegmentSource(tokenizer, UDHRCorpus(), SEQLEN, 0, True)
    counts, targets, probe = {"en": 6, "sw": 2}, ["fr", "sw"], 3
    predictor = DamagePredictor(model, compressor, LanguageStatistics(model, source, "", None, pool=POOL),
                                targets, POOL, probe, dtype="float32")
    got = predictor.predict(counts)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # weights put back
    compressed = copy.deepcopy(model)
    mixture: dict = {}
    for language, count in counts.items():
        used = min(count, POOL)
        for key, value in hooked_sums(model, source.segments(language, used)).items():
            mixture[key] = mixture.get(key, 0) + value * (count / used)
    for i, layer in enumerate(Adapter(compressed).layers):
        for name, module in Adapter(compressed).linears(layer).items():
            compressor.compress(name, module, ColumnSquares.from_sum(mixture[i, name].float(),
                                                                    sum(counts.values()) * SEQLEN))
    for language in targets:
        probes = source.segments(language, POOL + probe)[POOL:]
        assert probes.shape[0] == probe
        want = probe_nll(compressed, probes) - probe_nll(model, probes)
        assert got[language] == pytest.approx(want, abs=1e-4)
    assert got["fr"] != got["sw"]


def test_predictions_read_calibration_text_only(tokenizer):
    model = tiny("llama")
    source = SegmentSource(tokenizer, CalibrationOnly(), SEQLEN, 0, True)
    predictor = DamagePredictor(model, Wanda(sparsity=0.5), LanguageStatistics(model, source, "", None, pool=POOL),
                                ["en", "sw", "fr"], POOL)
    assert set(predictor.predict({"en": 3, "fr": 2})) == {"en", "sw", "fr"}


def test_what_cannot_be_predicted_says_why():
    skeleton = tiny("llama")
    assert unsupported(Wanda(sparsity=0.5), skeleton) is None
    assert unsupported(RTN(bits=4), skeleton) is None
    assert "Hessian" in unsupported(SparseGPT(sparsity=0.5), skeleton)
    assert "Hessian" in unsupported(GPTQ(bits=4), skeleton)
    assert "changes no weight" in unsupported(Wanda(sparsity=0.0), skeleton)
    with pytest.raises(ValueError, match="risk.segments=0"):
        RiskConfig(segments=0)


def test_spearman_needs_three_languages_that_vary():
    assert spearman_or_none({"a": 1, "b": 2, "c": 3}, {"a": 0.1, "b": 0.3, "c": 0.2}) == pytest.approx(0.5)
    assert spearman_or_none({"a": 1, "b": 2}, {"a": 0.1, "b": 0.3}) is None
    assert spearman_or_none({"a": 1, "b": 1, "c": 1}, {"a": 0.1, "b": 0.3, "c": 0.2}) is None


def test_extrapolation_scales_the_anchors_log_ratio_by_the_change_of_output_error(tokenizer):
    model = tiny("llama")
    source = SegmentSource(tokenizer, UDHRCorpus(), SEQLEN, 0, True)
    predictor = DamagePredictor(model, Wanda(sparsity=0.5), LanguageStatistics(model, source, "", None, pool=POOL),
                                ["en", "sw"], POOL)
    anchor = predictor.assess({"en": 4})
    assert predictor.extrapolate(anchor, {"en": 4}) == pytest.approx(anchor.log_ratio)  # at the anchor: itself
    other = predictor.assess({"sw": 4})
    got = predictor.extrapolate(anchor, {"sw": 4})
    for k in ("en", "sw"):
        assert got[k] == pytest.approx(anchor.log_ratio[k] * other.output_error[k] / anchor.output_error[k])
    assert predictor.assess({"sw": 4}, probe=False).log_ratio == {}
