"""The Python API: the README's example runs as written (on a tiny Llama), and the mixture feeds other toolkits."""
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import mbs
from conftest import calibration
from mbs.compress.registry import COMPRESSORS

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = '"model=tiny-llama", "+model.tiny_config.hidden_size=128", "+model.tiny_config.intermediate_size=256"'


def readme_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    code = readme_example()
    assert '"model=bloom-560m"' in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace('"model=bloom-560m"', TINY), "README.md", "exec"), namespace)
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[:3]] == ["en", "sw", "yo"]
    assert all(float(line.split()[4]) > 0 for line in out[:3])  # bits per byte, compressed
    assert int(out[3]) == sum(p.stat().st_size for p in (tmp_path / "bloom-560m-w4g128").rglob("*") if p.is_file())
    dataset, mixture = namespace["dataset"], namespace["mixture"]
    assert len(dataset) == mixture.total == 16 and set(dataset.column_names) == {"input_ids", "attention_mask",
                                                                                 "language"}
    reloaded = mbs.load_exported(tmp_path / "bloom-560m-w4g128")
    assert mbs.perplexity(reloaded, namespace["windows"])["sw"].perplexity == namespace["compressed"]["sw"].perplexity


def test_readme_run_example_runs(tmp_path, monkeypatch, capsys):
    """The README's one-call example (``mbs.run``) as written, on a tiny Llama with a short evaluation."""
    section = README.read_text().split("## Python API", 1)[1]
    code = [c for c in re.findall(r"```python\n(.*?)```", section, re.S) if "mbs.run(" in c][0]
    monkeypatch.chdir(tmp_path)
    tiny = TINY + ', "logger=none", "sampler.segments=20", "eval.languages=[en,sw,yo]", "eval.max_windows=1"'
    exec(compile(code.replace('"model=bloom-560m"', tiny), "README.md", "exec"), {})
    geomean, languages = capsys.readouterr().out.strip().splitlines()[-1].split(" ", 1)  # after the run's table
    results = json.loads((tmp_path / "runs" / "bloom-gptq" / "results.json").read_text())
    assert float(geomean) == results["summary"]["geomean_ratio"] and languages == "['en', 'sw', 'yo']"
    assert results["run"]["choices"]["compressor"] == "gptq" and results["config"]["compressor"]["bits"] == 4


def test_mixture_dataset_holds_the_calibration_segments(tokenizer):
    mixture = calibration(tokenizer, {"en": 3, "sw": 1})
    dataset = mixture.to_dataset()
    assert dataset["language"] == ["en", "en", "en", "sw"]
    assert torch.equal(torch.tensor(dataset["input_ids"]), torch.cat([mixture.segments["en"], mixture.segments["sw"]]))
    assert all(mask == [1] * 32 for mask in dataset["attention_mask"])


def test_default_mixture_is_proportional_over_the_corpus_languages(tokenizer):
    mixture = mbs.calibration_mixture(tokenizer, mbs.UDHRCorpus(), {"en": 60.0, "sw": 30.0, "fr": 10.0}, seqlen=32)
    assert {k: v.shape[0] for k, v in mixture.segments.items()} == {"en": 77, "sw": 38, "fr": 13}


def test_import_mbs_is_light():
    import subprocess
    import sys

    code = "import sys, mbs; assert 'torch' not in sys.modules and 'transformers' not in sys.modules; mbs.GPTQ"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=README.parent)


# What the run configs give each class that its Python default does not, and why (the docstrings say so too).
CONFIG_ONLY = {"languages": "the run configs take ${eval.languages}; in Python the caller names them"}


def class_defaults(cls) -> dict:
    return {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls) if f.name not in CONFIG_ONLY}


def composed(cfg, cls) -> dict:
    built = OmegaConf.to_object(cfg)
    assert type(built) is cls
    return {f.name: getattr(built, f.name) for f in dataclasses.fields(cls) if f.name not in CONFIG_ONLY}


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_compressor_classes_default_to_the_run_configs(name):
    """``mbs.GPTQ()`` is ``compressor=gptq``, and so on for every compressor (conf/compressor/*.yaml)."""
    cls = COMPRESSORS[name]
    assert class_defaults(cls) == composed(mbs.compose(f"compressor={name}").compressor, cls)


@pytest.mark.parametrize("option, cls", [("mbs", mbs.ProportionalSampler), ("temperature", mbs.TemperatureSampler),
                                         ("uniform", mbs.UniformSampler), ("monolingual", mbs.MonolingualSampler)])
def test_sampler_classes_default_to_the_run_configs(option, cls):
    assert class_defaults(cls) == composed(mbs.compose(f"sampler={option}").sampler, cls)


def test_counts_sampler_and_engine_default_to_the_run_configs():
    cfg = mbs.compose("sampler=counts", "++sampler.per_language={en: 3}")
    assert composed(cfg.sampler, mbs.CountsSampler) == {**class_defaults(mbs.CountsSampler), "per_language": {"en": 3}}
    assert class_defaults(mbs.EngineConfig) == composed(cfg.engine, mbs.EngineConfig)
    assert mbs.GPTQ() == mbs.configure("compressor=gptq").compressor  # the README's promise, as one comparison
