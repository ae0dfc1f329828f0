"""Export: a compressed-tensors checkpoint reloads with transformers to the very weights that were evaluated in memory,
so every language's perplexity is the same; the format is what the library writes; bad export input fails early."""
import json

import pytest
import torch
from safetensors import safe_open

import mbs
from conftest import calibration
from mbs.models.tiny import tiny_model
from mbs.record.export import check_export, load_exported

LANGUAGES = ["en", "sw"]


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """A tiny Llama whose widths take 128-column groups, saved and reloaded in bf16 as a real model would be (scales
    are then rounded to bf16: the hard case for an exact round trip)."""
    directory = tmp_path_factory.mktemp("tiny-bf16")
    tiny_model("llama", {"hidden_size": 128, "intermediate_size": 256}).save_pretrained(directory)
    return directory


def bf16_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval().requires_grad_(False)


COMPRESSORS = [
    (mbs.Wanda(n=2, m=4), False),
    (mbs.SparseGPT(sparsity=0.5), False),
    (mbs.GPTQ(), True),  # the default: 4 bits, asymmetric, g128, act-order with static groups
    (mbs.GPTQ(bits=4, groupsize=128, sym=True), True),
    (mbs.GPTQ(bits=4, groupsize=-1), True),  # asymmetric, one grid per row: packed zero points per channel
    (mbs.RTN(bits=4, groupsize=128), True),
    (mbs.RTN(bits=8, groupsize=-1, sym=True), True),  # 8 bits: a bf16 quotient can round half a level off
    (mbs.AWQ(), True),  # 4 bits, g128, zero point; its scales change the norms too (saved dense)
]
IDS = ["wanda-2:4", "sparsegpt-50%", "gptq-default", "gptq-4b-g128-sym", "gptq-4b-channel", "rtn-4b-g128",
       "rtn-8b-channel-sym", "awq-4b-g128"]


def plain_call(directory):
    """What a user tries first: no dtype, no quantization_config."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("compressor, packed", COMPRESSORS, ids=IDS)
def test_reloaded_checkpoint_has_the_same_weights_and_perplexity(bf16_dir, tokenizer, tmp_path, compressor, packed):
    model = bf16_model(bf16_dir)
    mbs.compress_model(model, compressor, calibration(tokenizer, seqlen=48))
    windows = mbs.evaluation_windows(tokenizer, mbs.UDHRCorpus(), LANGUAGES, seqlen=64, prepend_bos=True,
                                     max_windows=3)
    before = {k: v.perplexity for k, v in mbs.perplexity(model, windows).items()}
    info = mbs.export(model, tmp_path / "out", compressor, tokenizer)
    ours = model.state_dict()
    for reloaded in (load_exported(tmp_path / "out", torch.bfloat16), plain_call(tmp_path / "out")):
        assert reloaded.dtype == torch.bfloat16  # the plain call keeps the checkpoint's dtype
        # the same computation on the same weights in the same process: the very same perplexities (a symmetric
        # checkpoint loaded by the plain call is decompressed by this first forward)
        assert {k: v.perplexity for k, v in mbs.perplexity(reloaded, windows).items()} == before
        theirs = reloaded.state_dict()
        # a symmetric checkpoint loaded compressed keeps its scales and shapes beside the decompressed weights
        assert {k.rsplit(".", 1)[-1] for k in set(theirs) - set(ours)} <= {"weight_scale", "weight_shape"}
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), \
            [k for k in ours if not torch.equal(ours[k], theirs[k])]

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert info["bytes_on_disk"] > info["weights_bytes"] > 0 and info["dense_bytes"] > 0
    if packed:
        q = config["quantization_config"]
        weights = q["config_groups"]["group_0"]["weights"]
        assert (q["format"], q["quant_method"], q["ignore"]) == ("pack-quantized", "compressed-tensors", ["lm_head"])
        assert (weights["num_bits"], weights["symmetric"]) == (compressor.bits, compressor.sym)
        assert weights["strategy"] == ("group" if compressor.groupsize > 0 else "channel")
        assert "model.layers.0.mlp.down_proj.weight_packed" in keys and "model.layers.0.mlp.down_proj.weight" not in keys
        assert ("model.layers.0.mlp.down_proj.weight_zero_point" in keys) == (not compressor.sym)
        # asymmetric: transformers is told to decompress at load time (its compressed load cannot take packed zero
        # points); symmetric checkpoints load compressed as the library wrote them
        assert q.get("dequantize", False) == (not compressor.sym)
        assert info["format"] == "compressed-tensors/pack-quantized" and info["quantized_modules"] == 21
        assert info["non_embedding_to_dense"] < (0.6 if compressor.bits == 8 else 0.35)
    else:  # compressed-tensors 0.20 writes no sparse format: a dense checkpoint with the pruned zeros
        assert "quantization_config" not in config and info["format"] == "dense"
        assert info["weights_to_dense"] == pytest.approx(1.0, abs=0.01)


def test_gptq_records_are_keyed_by_full_module_name(tokenizer):
    model = tiny_model("llama", {})
    gptq = mbs.GPTQ(bits=4, groupsize=32)
    mbs.compress_model(model, gptq, calibration(tokenizer))
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert set(gptq.records) == names
    assert "model.layers.2.self_attn.o_proj" in gptq.records


def test_bad_export_input_is_refused():
    with pytest.raises(ValueError, match=r"save_format='safetensors' is not a known format; allowed: "
                                         r"compressed-tensors, dense"):
        check_export("safetensors", mbs.Wanda())
    with pytest.raises(ValueError, match=r"static_groups=true .*or save_format=dense"):
        check_export("compressed-tensors", mbs.GPTQ(groupsize=32, actorder=True, static_groups=False))
    check_export("dense", mbs.GPTQ(groupsize=32, actorder=True, static_groups=False))  # a dense checkpoint holds any result
    check_export("compressed-tensors", mbs.GPTQ(groupsize=-1, actorder=True, static_groups=False))  # per channel: none

    class Conv1D(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match=r"h.0.attn.c_attn: compressed-tensors packs nn.Linear weights, not Conv1D"):
        check_export("compressed-tensors", mbs.RTN(), {"h.0.attn.c_attn": Conv1D()})


@pytest.mark.parametrize("overrides, message", [
    (["save_format=onnx"], "mbs: error: save_format='onnx' is not a known format; allowed: compressed-tensors, dense"),
    (["compressor=gptq", "compressor.groupsize=32", "compressor.static_groups=false", "save_model=true"],
     "mbs: error: compressor.actorder=true with compressor.static_groups=false makes groups of permuted columns"),
])
def test_run_py_refuses_bad_export_input_in_one_line(tmp_path, overrides, message):
    from conftest import run_py

    proc = run_py(tmp_path, "model=tiny-llama", "logger=none", *overrides, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(message), proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "model").exists()


def test_a_failed_export_leaves_the_previous_checkpoint(tmp_path, tokenizer, monkeypatch):
    model = tiny_model("llama", {})
    rtn = mbs.RTN(bits=4, groupsize=32)
    mbs.compress_model(model, rtn, calibration(tokenizer))
    first = mbs.export(model, tmp_path / "model", rtn)
    before = {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()}
    model.model.layers[0].mlp.up_proj.weight.data[0, 0] += 1e-3  # off the grid: must not be written
    with pytest.raises(RuntimeError, match=r"model.layers.0.mlp.up_proj: 1 weights do not decompress"):
        mbs.export(model, tmp_path / "model", rtn)
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and first["quantized_modules"] == 21
