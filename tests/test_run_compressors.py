"""End to end through run.py (Hydra composition, pipeline, results.json) on the tiny models, and save_model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # run.py in subprocesses (deselect: -m "not slow")
FAST = ["logger=none", "progress=false", "sampler.segments=12", "eval.languages=[en,fr,sw]", "engine.batch_size=4"]


def run_mbs(tmp_path: Path, *overrides: str) -> dict:
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "run.py", *FAST, *overrides, f"hydra.run.dir={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("arch, overrides, method", [
    ("bloom", ["compressor=sparsegpt"], "sparsegpt"),
    ("gemma3", ["compressor=gptq", "compressor.bits=3", "compressor.groupsize=32", "compressor.actorder=true",
                "compressor.static_groups=true"], "gptq"),
])
def test_run_py(tmp_path, arch, overrides, method):
    results = run_mbs(tmp_path, f"model=tiny-{arch}", *overrides)
    c = results["compression"]
    assert c["method"] == method
    if method == "sparsegpt":
        assert c["sparsity"] == pytest.approx(0.5)
    else:
        assert all(m["bits"] == 3 and m["groupsize"] == 32 for layer in c["layers"] for m in layer["modules"].values())
    assert {r["language"] for r in results["languages"]} == {"en", "fr", "sw"}
    assert all(r["compressed_ppl"] > 0 for r in results["languages"])


def test_save_model_reloads_with_the_same_perplexity(tmp_path):
    from transformers import AutoTokenizer

    from mbs.data.calibration import build_eval_windows
    from mbs.data.corpora import UDHRCorpus
    from mbs.evaluate.perplexity import evaluate_languages
    from mbs.record.export import load_exported

    results = run_mbs(tmp_path, "model=tiny-llama", "compressor=sparsegpt", "compressor.bits=4", "save_model=true")
    directory = tmp_path / "run" / "model"
    assert (directory / "model.safetensors").exists() and (directory / "config.json").exists()
    e = results["export"]
    assert e["format"] == "compressed-tensors/pack-quantized" and e["bytes_on_disk"] > e["weights_bytes"] > 0
    assert e["weights_bytes"] < e["dense_bytes"] and e["quantized_modules"] == 21
    model = load_exported(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    proj = model.model.layers[0].self_attn.q_proj.weight
    assert float((proj == 0).float().mean()) >= 0.5
    spec = results["config"]["model"]
    windows = build_eval_windows(tokenizer, UDHRCorpus(), ["en", "fr", "sw"], spec["seqlen"], spec["prepend_bos"])
    reloaded = evaluate_languages(model, windows, "cpu", 8, 1024, progress=False)
    for row in results["languages"]:
        assert reloaded[row["language"]].perplexity == pytest.approx(row["compressed_ppl"], rel=1e-9), row
    assert torch.isfinite(proj).all()


def test_default_gptq_checkpoint_opens_with_the_plain_call(tmp_path):
    """compressor=gptq as configured (4 bits, asymmetric, g128, act-order, static groups) with save_model=true: the
    plain ``from_pretrained(dir)`` loads it (no quantization_config argument), to the weights that mbs.load_exported
    gives, and every language's perplexity is the run's compressed one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mbs.data.calibration import build_eval_windows
    from mbs.data.corpora import UDHRCorpus
    from mbs.evaluate.perplexity import evaluate_languages
    from mbs.record.export import load_exported

    results = run_mbs(tmp_path, "model=tiny-llama", "+model.tiny_config.hidden_size=128",
                      "+model.tiny_config.intermediate_size=256",
                      "compressor=gptq", "save_model=true")
    c = results["config"]["compressor"]
    assert (c["bits"], c["sym"], c["groupsize"], c["actorder"], c["static_groups"]) == (4, False, 128, True, True)
    directory = tmp_path / "run" / "model"
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear  # decompressed at load time
    reference = load_exported(directory).state_dict()
    assert set(model.state_dict()) == set(reference)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    spec = results["config"]["model"]
    windows = build_eval_windows(AutoTokenizer.from_pretrained(directory), UDHRCorpus(), ["en", "fr", "sw"],
                                 spec["seqlen"], spec["prepend_bos"])
    reloaded = evaluate_languages(model, windows, "cpu", 8, 256, progress=False)
    for row in results["languages"]:
        # the same fp32 weights and computation in another process: only a different summation order (thread
        # count) can move the result, by a few fp32 ulps per op (eps 1.2e-7)
        assert reloaded[row["language"]].perplexity == pytest.approx(row["compressed_ppl"], rel=1e-6), row
