"""`python run.py` end to end on tiny models, as a user runs it."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_py

pytestmark = pytest.mark.slow  # run.py in subprocesses (deselect: -m "not slow")


@pytest.mark.parametrize("arch, compressor", [("gemma3", "wanda"), ("bloom", "magnitude"), ("llama", "dense")])
def test_run_end_to_end(tmp_path, arch, compressor):
    proc = run_py(tmp_path, f"model=tiny-{arch}", f"compressor={compressor}", "logger=none", "sampler.segments=40",
                  "eval.languages=[en,sw,zh-Hans,yo]", "risk.predict=true")
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["language"] for r in results["languages"]] == ["en", "sw", "zh-Hans", "yo"]
    assert sum(results["calibration"]["segments"].values()) == 40
    expected = {"wanda": 0.5, "magnitude": 0.5, "dense": 0.0}[compressor]
    assert results["compression"]["sparsity"] == pytest.approx(expected, abs=0.01)
    for layer in results["compression"]["layers"]:  # Wanda: exact per row, so exact per layer
        modules = layer["modules"].values()
        assert layer["sparsity"] == sum(m["zeros"] for m in modules) / sum(m["params"] for m in modules)
        if compressor != "magnitude":
            assert layer["sparsity"] == expected
    for row in results["languages"]:
        assert row["ratio"] == pytest.approx(row["compressed_ppl"] / row["dense_ppl"])
        if compressor == "dense":
            assert row["ratio"] == 1.0
        # bits per byte: NLL / (ln 2 · bytes of the predicted text), so the two differ by log ratio · tokens per byte
        assert row["bytes"] > row["tokens"] and row["dense_bpb"] > 0  # the 512-token tiny BPE: > 1 byte per token
        per_byte = row["tokens"] / (math.log(2) * row["bytes"])
        assert row["dense_bpb"] == pytest.approx(math.log(row["dense_ppl"]) * per_byte)
        assert row["compressed_bpb"] - row["dense_bpb"] == pytest.approx(row["log_ratio"] * per_byte, abs=1e-12)
    assert {"cpu", "cpu_flags", "blas", "mkldnn", "threads", "torch", "device"} <= set(results["environment"])
    assert results["schema_version"] == 2
    segments = results["calibration"]["segments"]
    for row in results["languages"]:  # what the W&B table shows, in results.json too
        assert row["calibration_segments"] == segments.get(row["language"], 0)
        assert row["low_resource"] == (row["language"] in results["summary"]["low_resource_languages"])
    provenance = results["provenance"]
    assert provenance["commit"] and len(provenance["commit"]) == 40  # the tests run from a git checkout
    assert provenance["started"] <= provenance["finished"] and provenance["versions"]["torch"]
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("experiment_id,language,training_share_pct,dense_ppl")
    assert "dense_bpb,compressed_bpb,tokens,bytes,low_resource,calibration_segments" in csv_lines[0]
    assert all(line.startswith(results["experiment_id"] + ",") for line in csv_lines[1:])
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# ") and f"experiment {results['experiment_id']}" in md and "| en |" in md
    assert "| en |" in proc.stdout and "| dense bpb |" in proc.stdout  # the table is printed at the end
    if compressor == "dense":  # nothing to predict: said, not recorded as zeros
        assert "risk" not in results and "changes no weight" in results["risk_skipped"]
    else:  # predicted before compressing, the measured beside it after (mbs/analyze/damage.py)
        risk = results["risk"]
        languages = {"en", "sw", "zh-Hans", "yo"}
        assert set(risk["predicted"]) == set(risk["measured_log_ratio"]) == set(risk["per_layer"]) == languages
        assert all(math.isfinite(value) for value in risk["predicted"].values())  # a log ratio: either sign
        assert set(risk["output_error"]) == languages and all(v > 0 for v in risk["output_error"].values())
        assert risk["probe_segments_per_language"] == 4
        assert {len(v) for v in risk["per_layer"].values()} == {len(results["compression"]["layers"])}
        assert risk["measured_log_ratio"] == {r["language"]: r["log_ratio"] for r in results["languages"]}
        assert risk["spearman"] is None or -1 <= risk["spearman"] <= 1
        before = proc.stdout.index("of each evaluated language, before compressing")
        assert before < proc.stdout.index("| dense bpb |") < proc.stdout.index("vs measured log ratio; Spearman")
        assert results["timings"]["risk_s"] > 0


def test_wandb_offline_run_holds_the_language_table(tmp_path):
    run_py(tmp_path, "model=tiny-llama", "logger=wandb", "logger.mode=offline", "sampler.segments=20",
           "eval.languages=[en,sw]", "analysis.statistic=mean_square", "risk.predict=true")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = list(runs[0].glob("*.wandb"))
    assert files and files[0].stat().st_size > 0
    blob = files[0].read_bytes()
    assert b"languages" in blob and b"ratio/sw" in blob
    assert b"similarity/layer0/heatmap" in blob and b"similarity/layer2/to_calibration" in blob
    assert b"predicted_damage/sw" in blob and b"risk/spearman" not in blob  # two languages: no correlation to give


def test_bad_input_is_one_line_and_leaves_results_alone(tmp_path):
    run_py(tmp_path, "model=tiny-llama", "logger=none", "sampler.segments=20", "eval.languages=[en,sw]")
    before = (tmp_path / "results.json").read_bytes()
    results = json.loads(before)  # two languages: the default (centred) similarity is skipped, and says why
    assert results["similarity"] is None and "needs at least 3" in results["similarity_skipped"]
    proc = run_py(tmp_path, "model=tiny-llama", "logger=none", "eval.languages=[en,xx]", check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == [errors[0]] and errors[0].startswith("mbs: error: unknown language code 'xx'")
    assert (tmp_path / "results.json").read_bytes() == before


@pytest.mark.parametrize("override, message", [
    ("model=bloom-9000", "mbs: error: unknown model 'bloom-9000'; available: aya-expanse-8b, bloom-"),
    ("compressor=wanda,obs", "mbs: error: unknown compressor 'obs'; available: awq, dense, "),
])
def test_unknown_option_is_one_line(tmp_path, override, message):
    args = ["--multirun", override] if "," in override else [override]
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(message) and len(proc.stderr.strip().splitlines()) == 1


def test_layer_shape_errors_come_before_the_model_loads(tmp_path):
    """A group size that does not divide a layer's width is found on a weightless skeleton, in one line."""
    proc = run_py(tmp_path, "model=tiny-llama", "logger=none", "compressor=gptq", "compressor.groupsize=48", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("mbs: error: model.layers.0.self_attn.q_proj: compressor.groupsize=48 does not divide "
                                   "in_features=64")
    assert not (tmp_path / "results.json").exists()


def test_unreachable_hub_model_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "run.py", "model=bloom-560m", "logger=none", f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mbs: error: could not load 'bigscience/bloom-560m'")
    assert "model.path" in lines[0]
