"""`model=hf model.path=...`: any causal LM, named after its path, with dtype, seqlen and BOS read from its own config
and tokenizer before the weights load, and its language distribution estimated."""
import json

import pytest
import torch

from conftest import compose_run, run_py


def local_model(directory, tokenizer, *, max_positions=96, dtype=torch.float32, bos=True):
    """A tiny Llama saved in the layout a hub download has (config.json, model.safetensors, tokenizer files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=max_positions, vocab_size=len(tokenizer),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(dtype).save_pretrained(directory)
    tokenizer.add_bos_token = bos  # what the tokenizer does by itself decides model.prepend_bos=auto
    tokenizer.save_pretrained(directory)
    return directory


def test_hf_names_the_model_after_its_path():
    cfg = compose_run("model=hf", "model.path=Qwen/Qwen2.5-0.5B")
    assert cfg.model.name == "qwen2.5-0.5b"
    assert cfg.model.distribution_estimate and cfg.model.distribution_is_proxy
    assert compose_run("model=hf", "model.path=/data/models/My Llama/").model.name == "my-llama"
    assert compose_run("model=hf", "model.path=x", "model.name=mine").model.name == "mine"


def test_spec_reads_open_settings_from_config_and_tokenizer(tokenizer):
    from transformers import GPT2Config, LlamaConfig

    from mbs.models.spec import ModelSpec

    spec = ModelSpec(name="", source="hub", path="org/Some-Model", dtype="auto", seqlen=None, prepend_bos="auto")
    assert spec.name == "some-model" and spec.open_fields() == ["model.dtype", "model.seqlen", "model.prepend_bos"]
    said = spec.complete(LlamaConfig(max_position_embeddings=131072, dtype="float16"), tokenizer)
    assert (spec.dtype, spec.seqlen, spec.prepend_bos) == ("float16", 2048, tokenizer("a")["input_ids"][0] == 1)
    assert "maximum positions 131072" in said and spec.open_fields() == []
    spec = ModelSpec(name="g", source="hub", path="gpt2", dtype="auto", seqlen=None)
    spec.complete(GPT2Config(n_positions=1024), tokenizer)
    assert (spec.dtype, spec.seqlen) == ("bfloat16", 1024)  # no dtype declared: bfloat16
    with pytest.raises(ValueError, match=r"model.prepend_bos='maybe' must be true, false or auto"):
        ModelSpec(name="g", source="hub", path="gpt2", prepend_bos="maybe")
    with pytest.raises(ValueError, match=r"model.seqlen can be read from the model only with source=hub"):
        ModelSpec(name="t", source="tiny", tiny_arch="llama", seqlen=None)


@pytest.mark.slow
def test_hf_run_on_a_local_model_in_hub_layout(tmp_path, tokenizer):
    model = local_model(tmp_path / "My-Model", tokenizer, max_positions=96, dtype=torch.float32, bos=True)
    out = tmp_path / "run"
    proc = run_py(out, "model=hf", f"model.path={model}", "sampler.segments=8", "eval.languages=[en,sw,fr]",
                  "eval.max_windows=2", "logger=none")
    log = proc.stdout + proc.stderr
    assert "model my-model" in log and "seqlen 96 (maximum positions 96" in log, log[-3000:]
    assert "prepend_bos true (the tokenizer adds BOS by itself)" in log
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["name"] == "my-model"
    assert (results["model"]["dtype"], results["model"]["seqlen"], results["model"]["prepend_bos"]) == \
        ("float32", 96, True)
    assert results["model"]["distribution_is_proxy"] is True and results["model"]["path"] == str(model)
    assert results["config"]["model"]["dtype"] == "auto"  # the config as given; results["model"] as run


def test_hf_with_a_missing_local_directory_says_so():
    from mbs.models.spec import ModelSpec

    with pytest.raises(ValueError, match=r"^model.path='/no/such/dir' is not a directory; give a local model"):
        ModelSpec(name="", source="hub", path="/no/such/dir")


def test_hf_without_a_path_says_so(tmp_path):
    proc = run_py(tmp_path, "model=hf", check=False)
    assert proc.returncode != 0
    assert "model.path" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
