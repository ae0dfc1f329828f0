"""The similarity statistics (analysis.statistic): the residual source is the input of each decoder layer, centring
and logs as documented, the record names its statistic, and separability measures what it says."""
import numpy as np
import pytest
import torch

from conftest import calibration, tiny
from mbs.analyze import similarity
from mbs.compress.engine import EngineConfig
from mbs.models.adapter import Adapter


@pytest.mark.parametrize("arch", ["llama", "gemma3", "bloom"])
def test_residual_vectors_are_the_mean_input_of_each_decoder_layer(tokenizer, arch):
    """Equal to a plain pre-hook on the decoder layer (its hidden-state input), first position of every segment left
    out, per language; the model is left on the offload device and unchanged."""
    model = tiny(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = calibration(tokenizer, {"en": 3, "sw": 2})
    vectors = similarity.language_vectors(model, probe, [0, 2], EngineConfig(batch_size=2), "residual")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    layers = Adapter(model).layers
    for index in (0, 2):
        for language, segments in probe.segments.items():
            seen = []

            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                seen.append(hidden[:, 1:].reshape(-1, hidden.shape[-1]))

            handle = layers[index].register_forward_pre_hook(hook, with_kwargs=True)
            with torch.no_grad():
                model(input_ids=segments)
            handle.remove()
            expected = torch.cat(seen).double().mean(0)
            torch.testing.assert_close(vectors[index][language].double(), expected, rtol=1e-5, atol=1e-6)


def test_centred_statistics_subtract_the_evaluated_languages_mean():
    vectors = {"en": torch.tensor([4.0, 1.0, 1.0]), "sw": torch.tensor([1.0, 4.0, 1.0]),
               "fr": torch.tensor([1.0, 1.0, 4.0]), "yo": torch.tensor([2.0, 2.0, 2.0])}
    mix = {"mixture": np.array([2.5, 2.5, 1.0])}
    centred = similarity.STATISTICS["mean_square_centred"]
    out, extra = similarity.transformed(vectors, mix, centred, ["en", "sw", "fr"])
    np.testing.assert_allclose(np.mean([out[k] for k in ("en", "sw", "fr")], axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(out["yo"], [0, 0, 0], atol=1e-12)  # the evaluated languages' mean itself
    np.testing.assert_allclose(extra["mixture"], [0.5, 0.5, -1.0])
    logged, _ = similarity.transformed(vectors, {}, similarity.STATISTICS["log_mean_square_centred"], ["en", "sw"])
    np.testing.assert_allclose(logged["en"], np.log([4, 1, 1]) - np.log([2, 2, 1]))
    raw, _ = similarity.transformed(vectors, {}, similarity.STATISTICS["mean_square"], ["en"])
    np.testing.assert_allclose(raw["en"], [4, 1, 1])


def test_the_record_names_its_statistic_and_centres_on_the_evaluated_languages(tokenizer):
    g = torch.Generator().manual_seed(0)
    common = torch.rand(32, generator=g) * 10
    vectors = {0: {k: common + torch.rand(32, generator=g) for k in ("en", "sw", "fr", "yo")}}
    probe = calibration(tokenizer, {"en": 1})
    counts = {"en": 3, "sw": 1}
    records = {}
    for name in ("mean_square", "mean_square_centred"):
        config = similarity.AnalysisConfig(layers=[0], statistic=name)
        records[name] = similarity.similarity_record(vectors, [0], counts, probe, config, "udhr", ["en", "sw", "fr"])
        assert records[name]["statistic"] == name
        assert records[name]["description"] == similarity.STATISTICS[name].description
    raw, centred = records["mean_square"]["layers"]["0"], records["mean_square_centred"]["layers"]["0"]
    assert min(min(row) for row in raw["matrix"]) > 0.95  # a shared component: every cosine near 1
    off = [c for i, row in enumerate(centred["matrix"]) for j, c in enumerate(row) if i != j]
    assert max(off) < 0.5  # centred: the languages' own parts, nearly independent here
    mix = (3 * vectors[0]["en"].double() + vectors[0]["sw"].double()) / 4
    centre = torch.stack([vectors[0][k] for k in ("en", "sw", "fr")]).double().mean(0)
    expected = similarity.cosine(vectors[0]["yo"].double() - centre, mix - centre)
    assert centred["to_calibration"]["yo"] == pytest.approx(expected, abs=1e-12)


def test_separability_retrieval_and_gap():
    """Two samples of four languages: each language's own signature plus sample noise on a large shared component.
    Raw cosines are all near 1 yet retrieval is perfect (the signatures decide the order); with the samples swapped
    for another language's, retrieval falls to zero."""
    g = torch.Generator().manual_seed(1)
    shared = torch.rand(64, generator=g) * 20
    own = {k: torch.rand(64, generator=g) * 2 for k in ("en", "sw", "fr", "hi")}
    first = {k: shared + v + 0.1 * torch.rand(64, generator=g) for k, v in own.items()}
    second = {k: shared + v + 0.1 * torch.rand(64, generator=g) for k, v in own.items()}
    raw = similarity.separability(first, second, "mean_square")
    centred = similarity.separability(first, second, "mean_square_centred")
    assert raw.retrieval == 1.0 and centred.retrieval == 1.0 and raw.languages == 4
    assert raw.other > 0.95 and centred.other < 0.2
    assert centred.gap > raw.gap > 0
    rolled = dict(zip(second, list(second.values())[1:] + list(second.values())[:1]))
    assert similarity.separability(first, rolled, "mean_square_centred").retrieval == 0.0


def test_unknown_statistic_is_one_line():
    with pytest.raises(ValueError) as err:
        similarity.AnalysisConfig(statistic="mean")
    assert str(err.value) == ("analysis.statistic='mean' is not known; allowed: mean_square, mean_square_centred, "
                              "log_mean_square_centred, residual_mean, residual_mean_centred")


def test_a_centred_statistic_with_two_evaluated_languages_is_skipped_and_said(monkeypatch, caplog):
    """Centring on two languages makes their vectors opposite (every cosine ±1): the similarity is not computed, a
    warning says why before the model loads, and results.json records the reason (mbs/pipeline.py)."""
    from conftest import compose_run

    import mbs.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with caplog.at_level("WARNING"):
        prepared = pipeline.prepare(compose_run("model=tiny-llama", "eval.languages=[en,sw]"))
    reason = ("analysis.statistic=log_mean_square_centred centres on the evaluated languages and needs at least 3; "
              "eval.languages has 2 (en, sw): set analysis.statistic=mean_square or residual_mean for a similarity "
              "over fewer languages")
    assert prepared.similarity_skipped == reason and prepared.probe is None and not prepared.analysis_layers
    assert f"language similarity SKIPPED: {reason}" in caplog.text
    kept = pipeline.prepare(compose_run("model=tiny-llama", "eval.languages=[en,sw]", "analysis.statistic=mean_square"))
    assert kept.similarity_skipped is None and kept.probe is not None
    off = pipeline.prepare(compose_run("model=tiny-llama", "eval.languages=[en,sw]", "analysis.layers=[]"))
    assert off.similarity_skipped is None
