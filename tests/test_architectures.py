"""Any decoder-only architecture: layers found from the model, GPT-2's Conv1D as the Linear it is, MoE experts with
their own statistics from the tokens routed to them, and one-line errors when the layers cannot be found."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import calibration, replay, tiny
from mbs.compress.engine import EngineConfig, capture, collect_statistics, compress_model, run_layer
from mbs.compress.pruning import Magnitude, Wanda
from mbs.compress.quantization import GPTQ, RTN
from mbs.compress.sparsegpt import SparseGPT
from mbs.models.adapter import Adapter, Conv1DView, set_layers_path
from mbs.models.experts import ExpertView
from mbs.models.tiny import TINY

LAYERS = {"bloom": "transformer.h", "gpt2": "transformer.h", "gemma3_multimodal": "model.language_model.layers"}


ROOT = Path(__file__).resolve().parents[1]
NEW = sorted(set(TINY) - {"bloom", "llama", "gemma3"})  # those three are tested throughout test_engine.py


@pytest.mark.parametrize("arch", NEW)
def test_layers_are_found_and_replay_reproduces_logits(arch, tokenizer):
    """The layers, the call replay (positional masks for GPT-2/XGLM, tuple outputs for BLOOM) and the head (Gemma 2
    soft-capping, Cohere logit_scale) are all right when the replayed layers give the model's own logits."""
    model = tiny(arch)
    adapter = Adapter(model)
    assert adapter.layers_path == LAYERS.get(arch, "model.layers")
    batches = calibration(tokenizer, seqlen=24).batches(4)[:2]
    captured = capture(adapter, batches, "cpu")
    hidden = captured.inputs
    for i, layer in enumerate(adapter.layers):
        hidden = run_layer(layer, adapter, hidden, captured.layer_kwargs[i])
    for (_, ids), h in zip(batches, hidden):
        with torch.no_grad():
            theirs = model(input_ids=ids).logits.float()
        assert torch.equal(adapter.logits(adapter.norm(h)), theirs)
    adapter.check_logits(batches[0][1][:1])


def test_a_head_mbs_does_not_know_is_refused():
    model = tiny("llama")
    model.config.logit_scale = 3.0  # the adapter would scale, the model's forward does not
    with pytest.raises(RuntimeError, match="model type 'llama'.*differ from its own forward"):
        Adapter(model).check_logits(torch.arange(3, 19)[None])


def test_layers_that_cannot_be_found_name_the_model_type_and_the_override():
    model = tiny("llama")
    model._no_split_modules = ["SomethingElse"]
    with pytest.raises(ValueError) as err:
        Adapter(model)
    message = str(err.value)
    assert "model type 'llama' (LlamaForCausalLM)" in message and "model.layers_path" in message
    assert "\n" not in message
    set_layers_path(model, "model.layers")
    assert Adapter(model).layers is model.model.layers
    set_layers_path(model, "model.norm")
    with pytest.raises(ValueError, match="model.layers_path='model.norm' does not name a non-empty ModuleList"):
        Adapter(model)


def _as_linear(model: nn.Module) -> nn.Module:
    """A copy of a GPT-2 model with every Conv1D replaced by the equivalent nn.Linear (weight transposed)."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child).__name__ == "Conv1D":
                linear = nn.Linear(child.weight.shape[0], child.weight.shape[1])
                linear.weight.data.copy_(child.weight.data.T)
                linear.bias.data.copy_(child.bias.data)
                setattr(module, child_name, linear)
    return twin.requires_grad_(False)


@pytest.mark.parametrize("compressor", [Wanda(n=2, m=4, sparsity=0.5), Magnitude(), SparseGPT(),
                                        GPTQ(bits=4, groupsize=32, actorder=True, static_groups=False), RTN(bits=3)],
                         ids=["wanda-2:4", "magnitude", "sparsegpt", "gptq", "rtn"])
def test_conv1d_is_compressed_exactly_as_the_equivalent_linear(compressor, tokenizer):
    model = tiny("gpt2")
    twin = _as_linear(model)
    ids = calibration(tokenizer).segments["en"]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, twin(input_ids=ids).logits, atol=1e-5)
    views = Adapter(model).linears(Adapter(model).layers[0])
    assert views and all(isinstance(v, Conv1DView) for v in views.values())
    calib = calibration(tokenizer, {"en": 2, "sw": 2}, seqlen=16)
    for m in (model, twin):
        compress_model(m, copy.deepcopy(compressor), calib, EngineConfig(batch_size=4), progress=False)
    for layer, twin_layer in zip(Adapter(model).layers, Adapter(twin).layers):
        twins = Adapter(twin).linears(twin_layer)
        for name, view in Adapter(model).linears(layer).items():
            torch.testing.assert_close(view.weight, twins[name].weight, rtol=0, atol=1e-5)
            assert torch.equal(view.weight == 0, twins[name].weight == 0) or not isinstance(compressor, Wanda)
    assert (Adapter(model).linears(Adapter(model).layers[1])["mlp.c_fc"].weight == 0).any()


def _moe_inputs(model, adapter, tokenizer, index=0):
    """(captured, the MoE block's input of each batch) for layer ``index``."""
    batches = calibration(tokenizer, seqlen=24).batches(4)
    captured = capture(adapter, batches, "cpu")
    hidden = captured.inputs
    for i in range(index):
        hidden = run_layer(adapter.layers[i], adapter, hidden, captured.layer_kwargs[i])
    seen = []
    handle = adapter.layers[index].mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    run_layer(adapter.layers[index], adapter, hidden, captured.layer_kwargs[index])
    handle.remove()
    return captured, hidden, seen


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_each_expert_gets_statistics_of_exactly_its_routed_tokens(arch, tokenizer):
    model = tiny(arch)
    adapter = Adapter(model)
    layer = adapter.layers[1]
    captured, hidden, moe_inputs = _moe_inputs(model, adapter, tokenizer, index=1)
    experts = layer.mlp.experts
    expected: dict[str, torch.Tensor] = {}
    tokens: dict[int, int] = {}
    for x in moe_inputs:
        x = x.reshape(-1, x.shape[-1])
        _, _, top_k = layer.mlp.gate(x)
        for e in range(experts.gate_up_proj.shape[0]):
            routed = x[(top_k == e).any(dim=1)]  # the reference: each token whose top-k holds e, once
            gate, up = nn.functional.linear(routed, experts.gate_up_proj[e]).chunk(2, dim=-1)
            h = experts.act_fn(gate) * up
            for name, inputs in ((f"mlp.experts.{e}.gate_proj", routed), (f"mlp.experts.{e}.down_proj", h)):
                expected[name] = expected.get(name, 0) + inputs.double().square().sum(dim=0)
            tokens[e] = tokens.get(e, 0) + routed.shape[0]
    stats, leader = collect_statistics(layer, adapter, Wanda(), hidden, captured.layer_kwargs[1], captured.languages,
                                       per_language=False)
    assert all(tokens.values()) and len(tokens) == 4
    for e, n in tokens.items():
        assert leader[f"mlp.experts.{e}.up_proj"] == f"mlp.experts.{e}.gate_proj"  # one input, one statistic
        for name in (f"mlp.experts.{e}.gate_proj", f"mlp.experts.{e}.down_proj"):
            (stat,) = stats[name].values()
            assert stat.tokens == n
            torch.testing.assert_close(stat.sum.double(), expected[name], rtol=1e-5, atol=1e-6)
    # the attention sees every token
    (attn,) = stats["self_attn.q_proj"].values()
    assert attn.tokens == sum(x.numel() // x.shape[-1] for x in moe_inputs)


@pytest.mark.parametrize("compressor", [Wanda(), GPTQ(bits=4, groupsize=32)], ids=["wanda", "gptq"])
def test_an_expert_no_token_reaches_is_left_as_is_and_reported(compressor, tokenizer):
    model = tiny("mixtral")
    adapter = Adapter(model)
    for layer in adapter.layers:  # a router that never picks expert 3
        gate = layer.mlp.gate
        original = gate.forward

        def never_three(x, original=original):
            logits, weights, index = original(x)
            return logits, weights, torch.where(index == 3, (index + 1) % 3, index)

        gate.forward = never_three
    before = {n: v.weight.clone() for n, v in adapter.linears(adapter.layers[0]).items()}
    report = compress_model(model, compressor, calibration(tokenizer), EngineConfig(batch_size=4), progress=False)
    untouched = {f"model.layers.{i}.mlp.experts.3.{m}" for i in range(3) for m in ("gate_proj", "up_proj", "down_proj")}
    assert set(report.uncalibrated) == untouched
    views = adapter.linears(adapter.layers[0])
    records = report.layers[0]["modules"]
    for name, view in views.items():
        if ".3." in name:
            assert torch.equal(view.weight, before[name]) and records[name]["tokens"] == 0 and records[name]["skipped"]
        else:
            assert not torch.equal(view.weight, before[name]), name
            if isinstance(view, ExpertView):
                assert records[name]["tokens"] > 0
    assert torch.isfinite(model.model.layers[0].mlp.experts.down_proj).all()


def _gpt_oss():
    """GPT-OSS experts: transposed [expert, in, out] weights with biases, gate and up interleaved, a clamped gate."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                          vocab_size=512, sliding_window=8)
    model = GptOssForCausalLM(config).eval().requires_grad_(False)
    for p in model.model.layers[0].mlp.experts.parameters():
        p.data.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_expert_views_tile_the_fused_weights_and_the_observing_forward_is_the_models(arch):
    from mbs.models.experts import observing_forward

    model = _gpt_oss() if arch == "gpt_oss" else tiny(arch)
    layer = Adapter(model).layers[0]
    experts = layer.mlp.experts
    x = torch.randn(40, model.config.hidden_size)
    _, weights, top_k = layer.mlp.router(x) if arch == "gpt_oss" else layer.mlp.gate(x)
    seen = {}
    ours = observing_forward(experts, "mlp.experts", lambda name, t: seen.setdefault(name, t.shape[0]), x, top_k,
                             weights)
    model.config._experts_implementation = "eager"
    torch.testing.assert_close(ours, experts(x, top_k, weights), rtol=1e-5, atol=1e-6)
    for e in range(4):
        assert seen.get(f"mlp.experts.{e}.gate_proj", 0) == int((top_k == e).sum())
    views = {n: v for n, v in Adapter(model).linears(layer).items() if ".experts." in n}
    assert len(views) == 12 and all(isinstance(v, ExpertView) for v in views.values())
    for k, view in enumerate(views.values(), start=1):  # every fused weight belongs to exactly one view
        assert torch.all(view.weight == view.weight)  # readable
        view.weight.data.fill_(k)
    fused = [experts.gate_up_proj, experts.down_proj]
    assert all((p != 0).all() for p in fused)
    assert sum(v.weight.numel() for v in views.values()) == sum(p.numel() for p in fused)
    assert sorted(torch.cat([p.flatten() for p in fused]).unique().tolist()) == list(range(1, 13))


def test_expert_views_edit_the_fused_parameters(tokenizer):
    model = tiny("mixtral")
    compress_model(model, Wanda(), calibration(tokenizer), EngineConfig(batch_size=4), progress=False)
    experts = Adapter(model).layers[0].mlp.experts
    half = experts.gate_up_proj.shape[1] // 2
    for fused in (experts.gate_up_proj[:, :half], experts.gate_up_proj[:, half:], experts.down_proj):
        per_row = (fused == 0).sum(dim=2)  # Wanda: exactly half of every row of every expert's gate, up and down
        assert torch.all(per_row == fused.shape[2] // 2)
    assert not (Adapter(model).layers[0].mlp.gate.weight == 0).any()  # the router stays dense


@pytest.mark.slow
def test_every_tiny_family_runs_end_to_end_through_run_py_with_wanda_and_gptq(tmp_path):
    """One multirun (one process) over every tiny family x {Wanda, GPTQ}: Hydra config, pipeline, results.json."""
    families = {f"tiny-{arch.replace('_', '-')}": arch for arch in TINY}
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "run.py", "--multirun", f"model={','.join(families)}",
         "hydra.sweeper.grids=[{compressor: wanda}, {compressor: gptq, compressor.groupsize: 32}]",
         "logger=none", "progress=false", "sampler.segments=8", "eval.languages=[en,sw]", "eval.max_windows=1",
         "engine.batch_size=4", "model.seqlen=32", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    assert sorted((r["model"]["name"], r["compression"]["method"]) for r in runs) == sorted(
        (name, method) for name in families for method in ("wanda", "gptq"))
    for r in runs:
        c = r["compression"]
        modules = [m for layer in c["layers"] for m in layer["modules"].values()]
        if c["method"] == "wanda":
            assert c["sparsity"] == pytest.approx(0.5, abs=1e-3)
        else:
            assert all(m["bits"] == 4 for m in modules if "skipped" not in m)
        skipped = [(layer["index"], n) for layer in c["layers"] for n, m in layer["modules"].items() if "skipped" in m]
        assert len(c["uncalibrated"]) == len(skipped)  # full names: <the layer's full name>.<name in the layer>
        assert all(u.endswith(f".{i}.{n}") for u, (i, n) in zip(c["uncalibrated"], skipped))
        assert all(row["compressed_ppl"] > 0 for row in r["languages"])
        if r["model"]["name"] in ("tiny-mixtral", "tiny-qwen2-moe"):
            experts = [m for layer in c["layers"] for n, m in layer["modules"].items() if ".experts." in n]
            assert len(experts) == 3 * 4 * 3 and all("tokens" in m for m in experts)


def test_layers_that_cannot_be_found_stop_the_run_before_the_model_loads(monkeypatch):
    """One line naming the model type and model.layers_path, from the weightless skeleton, before any weight loads."""
    from conftest import compose_run

    import mbs.pipeline as pipeline
    from mbs.models import loading

    def no_weights(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load_model", no_weights)
    with pytest.raises(pipeline.UserError, match=r"^model.layers_path='model.nope' does not name"):
        pipeline.prepare(compose_run("model=tiny-llama", "model.layers_path=model.nope", "logger=none"))

    def odd_skeleton(spec):
        model = loading.model_skeleton(spec)
        model._no_split_modules = []
        return model

    monkeypatch.setattr(pipeline, "model_skeleton", odd_skeleton)
    with pytest.raises(pipeline.UserError) as err:
        pipeline.prepare(compose_run("model=tiny-llama", "logger=none"))
    assert str(err.value).startswith("cannot find the decoder layers of model type 'llama' (LlamaForCausalLM)")
    assert "model.layers_path" in str(err.value) and "\n" not in str(err.value)


def test_a_model_with_no_causal_lm_class_is_one_line(tmp_path):
    from transformers import T5Config

    from mbs.models.loading import model_skeleton
    from mbs.models.spec import ModelSpec

    T5Config(num_layers=1, d_model=8, d_ff=8, num_heads=1, d_kv=8, vocab_size=16).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x")  # a local model directory must hold weights (checked first)
    with pytest.raises(ValueError, match=r"config.json describes an encoder-decoder model, not a causal language "
                                         r"model") as err:  # found in config.json, before any class is built
        ModelSpec(name="t5", source="hub", path=str(tmp_path))
    assert "\n" not in str(err.value)
    config = tmp_path / "config.json"  # a config that does not say it is an encoder-decoder: the skeleton finds out
    config.write_text(config.read_text().replace('"is_encoder_decoder": true', '"is_encoder_decoder": false'))
    (tmp_path / "model.safetensors").unlink()
    spec = ModelSpec(name="t5", source="tiny", tiny_arch="llama")
    spec.source, spec.path = "hub", str(tmp_path)
    with pytest.raises(ValueError, match=r"^model type 't5' \(.*\) has no causal-LM class in transformers") as err:
        model_skeleton(spec)
    assert "\n" not in str(err.value)


_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, vocab_size=512)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
MORE = {  # families with no tiny-* config that the adapter handles without an entry of its own
    "Phi3": _LLAMA, "Olmo2": _LLAMA, "Granite": dict(_LLAMA, logits_scaling=4.0), "StableLm": _LLAMA,
    "GPTNeoX": dict(_LLAMA, num_key_value_heads=None), "Starcoder2": _LLAMA, "Glm": dict(_LLAMA, head_dim=16),
    "Falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=512),
    "OPT": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
                word_embed_proj_dim=64),
    "Cohere2": dict(_LLAMA, sliding_window=8), "Qwen3Moe": dict(_LLAMA, head_dim=16, **_MOE),
    "Olmoe": dict(_LLAMA, num_experts=4, num_experts_per_tok=2), "Phimoe": dict(_LLAMA, num_local_experts=4,
                                                                                 num_experts_per_tok=2),
    "GptOss": dict(_LLAMA, num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=8),
    "DeepseekV3": dict(_LLAMA, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
                       qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(MORE))
def test_more_families_replay_exactly_and_compress(family, tokenizer):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**MORE[family], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    adapter = Adapter(model)
    calib = calibration(tokenizer, {"en": 4, "sw": 4}, seqlen=24)
    batches = calib.batches(4)
    captured, hidden = replay(adapter, batches)
    for (_, ids), h in zip(batches, hidden):
        assert torch.equal(adapter.logits(adapter.norm(h)), model(input_ids=ids).logits.float())
    adapter.check_logits(batches[0][1][:1])
    assert compress_model(model, Wanda(), calib, EngineConfig(batch_size=4), progress=False).sparsity == 0.5
    compress_model(model, GPTQ(bits=4, groupsize=-1), calib, EngineConfig(batch_size=4), progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
