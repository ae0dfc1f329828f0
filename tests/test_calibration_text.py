"""Calibration segments a corpus can hold, and saying how often calibration repeats its text (mbs.data.calibration
.calibration_text): every hub model config's headline command prepares its data up to the model load, with the tiny
tokenizer and a tiny skeleton standing in for the hub's."""
from pathlib import Path

import pytest

import mbs.pipeline as pipeline
from conftest import compose_run, tiny
from mbs.data.calibration import REPEAT_LIMIT, REPEAT_WARNING, CalibrationText, calibration_text
from mbs.data.corpora import UDHRCorpus

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
HUB_MODELS = sorted(p.stem for p in CONF.glob("*.yaml") if "source: hub" in p.read_text())


@pytest.fixture
def offline_hub(monkeypatch, tokenizer):
    """The hub's tokenizer and model config replaced by tiny stand-ins; loading weights fails the test."""
    monkeypatch.setattr(pipeline, "load_tokenizer", lambda spec: tokenizer)
    skeleton = tiny("llama")
    skeleton.config.max_position_embeddings = 1 << 20  # the stand-in's 512 positions are not the hub model's
    monkeypatch.setattr(pipeline, "model_skeleton", lambda spec: skeleton)
    monkeypatch.setattr(pipeline, "model_config", lambda spec: tiny("llama").config)  # model=hf reads it
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.mark.parametrize("model", HUB_MODELS)
def test_every_hub_model_config_prepares_its_headline_run(offline_hub, model):
    path = ["model.path=org/Some-Model"] if model == "hf" else []  # model=hf: the user names the model
    prepared = pipeline.prepare(compose_run(f"model={model}", *path, "sampler=mbs", "compressor=wanda", "logger=none"))
    text = prepared.calibration_text
    assert text.model_seqlen == prepared.run.model.seqlen and text.seqlen <= text.model_seqlen
    assert all(t.shape[1] == text.seqlen for t in prepared.calibration.segments.values())
    assert prepared.calibration.total > 0


def test_a_model_seqlen_the_text_cannot_hold_shortens_calibration_and_says_why(offline_hub, caplog):
    """The tiny tokenizer's shortest calibration text of these languages has 3,549 tokens: segments of 4,096 do not
    fit, so they become 1,024 tokens (a power of two, body at most half the text); evaluation keeps 4,096."""
    with caplog.at_level("WARNING"):
        prepared = pipeline.prepare(compose_run("model=bloom-560m", "model.seqlen=4096", "logger=none",
                                                "eval.languages=[en,sw,yo]", "sampler=uniform",
                                                "sampler.languages=[en,sw,yo]", "analysis.statistic=mean_square"))
    text = prepared.calibration_text
    shortest = min(text.available, key=text.available.get)
    assert text.seqlen == 1024 and text.seqlen - 1 <= text.available[shortest] // 2 < 2 * text.seqlen - 1
    assert "calibration segments shortened" in caplog.text and f"({shortest}, " in text.reason
    assert {t.shape[1] for t in prepared.calibration.segments.values()} == {1024}
    assert {t.shape[1] for t in prepared.probe.segments.values()} == {1024}
    assert 1024 < max(w.numel() for ws in prepared.windows.values() for w in ws) <= 4096  # evaluation: not shortened
    fixed = pipeline.prepare(compose_run("model=bloom-560m", "model.seqlen=4096", "calibration_seqlen=512",
                                         "logger=none", "eval.languages=[en,sw,yo]", "analysis.layers=[]"))
    assert fixed.calibration_text.seqlen == 512 and fixed.calibration_text.reason is None
    with pytest.raises(pipeline.UserError, match=r"calibration_seqlen=9000 must be in 8\.\.4096"):
        pipeline.prepare(compose_run("model=bloom-560m", "model.seqlen=4096", "calibration_seqlen=9000",
                                     "logger=none"))


def test_repeated_text_is_counted_and_named(tokenizer):
    counts = {"en": 300, "sw": 1}
    text = calibration_text(tokenizer, UDHRCorpus(), counts, 64, prepend_bos=True)
    assert text.requested == {"en": 300 * 63, "sw": 63}
    assert text.repeats["en"] == pytest.approx(300 * 63 / text.available["en"])
    warning = text.warning()
    assert warning.startswith(f"calibration repeats its text: en draws 18,900 tokens from {text.available['en']:,}")
    assert "sw" not in warning and text.record()["text"]["sw"]["requested"] == 63
    line = text.per_language(counts)  # the console names every language, repeating or not
    assert line.startswith(f"en 300 (18,900/{text.available['en']:,} x{text.repeats['en']:.1f}), sw 1 (63/")
    quiet = CalibrationText(64, 64, None, {"en": 1000}, {"en": int(REPEAT_WARNING * 1000)})
    assert quiet.warning() is None


def test_calibration_past_the_repeat_limit_is_refused_before_loading(monkeypatch):
    """Warned past x4, refused past calibration_max_repeats (x64): 20,000 English segments of 63 tokens from the
    UDHR's ~3,900 would be the same windows hundreds of times over."""
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    overrides = ("model=tiny-llama", "sampler=english", "sampler.segments=20000", "logger=none")
    with pytest.raises(pipeline.UserError, match=r"more than calibration_max_repeats=64 times: en draws 1,260,000 "
                                                 r"tokens from [\d,]+ \(x3\d\d\.\d\); use fewer segments") as err:
        pipeline.prepare(compose_run(*overrides))
    assert "\n" not in str(err.value)
    prepared = pipeline.prepare(compose_run(*overrides, "calibration_max_repeats=1000"))  # the key that allows it
    assert prepared.calibration.segments["en"].shape[0] == 20000


def test_the_repeat_limit_is_exclusive_and_not_part_of_the_experiment_id():
    from mbs.fingerprint import experiment_id

    CalibrationText(64, 64, None, {"en": 1000}, {"en": int(REPEAT_LIMIT * 1000)}).check()
    with pytest.raises(ValueError, match="en draws 64,001 tokens from 1,000"):
        CalibrationText(64, 64, None, {"en": 1000}, {"en": int(REPEAT_LIMIT * 1000) + 1}).check()
    assert experiment_id(compose_run("model=tiny-llama")) == experiment_id(
        compose_run("model=tiny-llama", "calibration_max_repeats=100"))
