"""The Python API: the README's example runs as written (on a tiny Llama), and the mixture feeds other toolkits."""
import re
from pathlib import Path

import torch

import mbs
from conftest import calibration

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
