"""``dry_run=true`` prints what a run would do (segments, tokens drawn, memory by arithmetic, evaluation tokens) from
the tokenized data alone: no weights are loaded and nothing is written."""
import pytest
from omegaconf import OmegaConf

import mbs.pipeline as pipeline
from conftest import compose_run
from mbs.sweep import SweepSummary


def test_a_dry_run_prints_the_plan_and_loads_no_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = pipeline.run(compose_run("model=tiny-llama", "logger=none", "dry_run=true", "sampler.segments=12",
                                   "eval.languages=[en,sw,yo]"), tmp_path / "run")
    printed = capsys.readouterr().out
    assert out == {"dry_run": printed.strip()} and not (tmp_path / "run").exists()
    prepared = pipeline.prepare(compose_run("model=tiny-llama", "logger=none", "sampler.segments=12",
                                            "eval.languages=[en,sw,yo]"))
    segments = prepared.calibration.total
    seqlen = prepared.calibration_text.seqlen
    assert f"calibration: {segments} segments x {seqlen} tokens = {segments * seqlen:,} tokens" in printed
    assert f"{prepared.parameters:,} parameters in" in printed and prepared.parameters > 0
    activations = segments * seqlen * prepared.hidden_size * 4  # the tiny model waits in float32
    assert f"activations kept between layers: {activations / 1e9:.2f} GB" in printed
    tokens = sum(w.numel() for ws in prepared.windows.values() for w in ws)
    assert "evaluation: 3 languages, " in printed and f"{tokens:,} tokens, dense and compressed" in printed
    assert "time: not estimated" in printed
    assert "predicted damage" not in printed  # risk.predict is off by default


def test_a_dry_run_says_what_the_prediction_forwards(tmp_path, capsys):
    pipeline.run(compose_run("model=tiny-llama", "logger=none", "dry_run=true", "risk.predict=true",
                             "eval.languages=[en,sw,yo]"), tmp_path / "run")
    assert "predicted damage: 8 calibration segments per evaluated and calibration language" in capsys.readouterr().out


def test_a_dry_run_says_when_the_damage_cannot_be_predicted(tmp_path, capsys):
    pipeline.run(compose_run("model=tiny-llama", "logger=none", "dry_run=true", "compressor=sparsegpt",
                             "risk.predict=true", "eval.languages=[en,sw,yo]"), tmp_path / "run")
    assert "predicted damage: SKIPPED (compressor sparsegpt compresses from Hessian statistics" in capsys.readouterr().out
    pipeline.run(compose_run("model=tiny-llama", "logger=none", "dry_run=true", "risk.predict=false",
                             "eval.languages=[en,sw,yo]"), tmp_path / "run")
    assert "predicted damage" not in capsys.readouterr().out


def test_a_dry_run_sweep_ends_without_failing(capsys):
    config = OmegaConf.create({"dry_run": True, "hydra": {"sweep": {"dir": "multirun/x"}}})
    SweepSummary().on_multirun_end(config)  # no SystemExit: nothing was meant to finish
    assert "dry run of the sweep multirun/x" in capsys.readouterr().out
