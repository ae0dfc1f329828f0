"""AWQ: the scale search, clip search and final rounding equal a straight transcription of the reference (llm-awq;
tests/transcriptions.py) on a Llama layer in float64; folding scales keeps every supported layer's function (Gemma's
(1 + w) norms and BLOOM's LayerNorm bias included); the engine calibrates the next layer on dense outputs."""
import copy
import re

import pytest
import torch

import mbs
from conftest import calibration
from mbs.compress.awq import AWQ
from mbs.compress.engine import capture, run_layer
from mbs.models.adapter import Adapter
from mbs.models.scale_groups import fold_scales, scale_groups
from mbs.models.tiny import tiny_model
from transcriptions import TIE_MARGIN, Margin, awq_llama_layer, awq_pseudo_quantize


def layer_inputs(model, tokenizer, index=0, batch_size=8):
    """Layer ``index``'s dense calibration inputs and call arguments, one batch per entry."""
    adapter = Adapter(model)
    captured = capture(adapter, calibration(tokenizer).batches(batch_size, by_language=False), "cpu")
    hidden = captured.inputs
    for i in range(index):
        hidden = run_layer(adapter.layers[i], adapter, hidden, captured.layer_kwargs[i])
    return adapter, hidden, captured.layer_kwargs[index]


@pytest.mark.parametrize("bits, group, index", [(3, 16, 0), (4, 32, 1)])
def test_one_layer_equals_the_reference_transcription(tokenizer, bits, group, index):
    # equal q/k/v head counts: v_proj and o_proj share a shape, so all four of the reference's groups are searched
    model = tiny_model("llama", {"num_key_value_heads": 4}).double().eval().requires_grad_(False)
    adapter, inputs, kwargs = layer_inputs(model, tokenizer, index, batch_size=64)  # one batch: the reference's cat
    assert len(inputs) == 1
    ours, theirs = adapter.layers[index], copy.deepcopy(adapter.layers[index])
    tokens = inputs[0].shape[0] * inputs[0].shape[1]
    compressor = AWQ(bits=bits, groupsize=group, clip_tokens=tokens // 4)  # the reference's stride: 4
    figures = compressor.prepare_layer(ours, adapter, inputs, kwargs)
    for name, linear in adapter.linears(ours).items():
        compressor.compress(name, linear, None)
    margin = Margin()
    awq_llama_layer(theirs, inputs[0], kwargs[0], bits, group, margin, n_sample_token=tokens // 4)
    assert margin.value > TIE_MARGIN, f"a reference decision lies {margin.value:.1e} from its tie: not a valid case"
    assert len(scale_groups(ours)) == 4 and set(figures) == {"input_layernorm", "self_attn.v_proj",
                                                             "post_attention_layernorm", "mlp.up_proj",
                                                             "clip_mean_bound"}
    assert 0 < min(f["ratio"] for k, f in figures.items() if k != "clip_mean_bound")  # the search moved off 0 ...
    assert any(v < 1 for v in figures["clip_mean_bound"].values())  # ... and clipped
    theirs_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs_state[key], rtol=1e-9, atol=1e-12, msg=key)


def test_the_grid_is_the_references(tokenizer):
    w = torch.randn(8, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.3  # min above 0 too
    w[0, :32] = torch.linspace(0.1, 0.9, 32, dtype=torch.float64)  # a group that does not contain 0
    spec = AWQ(bits=3, groupsize=32).spec
    ours = spec.quantize_groups(w, *spec.fit_groups(w))
    assert torch.equal(ours, awq_pseudo_quantize(w, 3, 32))
    assert (ours[0, :32] > 0).all()  # 0 is not a level of that group's grid


@pytest.mark.parametrize("arch", ["llama", "gemma", "gemma2", "gemma3", "qwen3", "mistral", "bloom"])
def test_folding_scales_keeps_the_layer_function(tokenizer, arch):
    model = tiny_model(arch, {}).double().eval().requires_grad_(False)
    adapter, inputs, kwargs = layer_inputs(model, tokenizer)
    layer = adapter.layers[0]
    with torch.no_grad():
        for p in layer.parameters():  # norms away from their initial ones: a wrong fold cannot hide
            p.add_(0.1 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(p.numel())))
    before = run_layer(layer, adapter, inputs, kwargs)
    groups = scale_groups(layer)
    modules = dict(layer.named_modules())
    for k, group in enumerate(groups):
        width = modules[group.linears[0]].weight.shape[1]
        fold_scales(layer, group, torch.rand(width, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
                    + 0.5)
    after = run_layer(layer, adapter, inputs, kwargs)
    for a, b in zip(before, after):  # Gemma's norms compute in fp32 whatever the weights' dtype: fp32-level error
        assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())


def test_the_next_layer_is_calibrated_on_dense_outputs(tokenizer, monkeypatch):
    """As in the reference: layer i+1's inputs are layer i's outputs before its scales, clipping and rounding."""
    model = tiny_model("llama", {}).eval().requires_grad_(False)
    dense = copy.deepcopy(model)
    seen = []
    original = AWQ.prepare_layer

    def spy(self, layer, adapter, inputs, kwargs):
        seen.append([x.clone() for x in inputs])
        return original(self, layer, adapter, inputs, kwargs)

    monkeypatch.setattr(AWQ, "prepare_layer", spy)
    cal = calibration(tokenizer)
    mbs.compress_model(model, AWQ(groupsize=32), cal)
    adapter = Adapter(dense)
    captured = capture(adapter, cal.batches(8, by_language=False), "cpu")
    expected = run_layer(adapter.layers[0], adapter, captured.inputs, captured.layer_kwargs[0])
    assert all(torch.equal(a, b) for a, b in zip(seen[1], expected))


@pytest.mark.parametrize("overrides, message", [
    (["model=tiny-gpt2"], "compressor=awq has no scale groups for GPT2Block layers; supported: Llama-style layers"),
    (["model=tiny-mixtral"], "compressor=awq has no scale groups for MixtralDecoderLayer layers"),
    (["model=tiny-cohere"], "compressor=awq has no scale groups for CohereDecoderLayer layers"),
    (["model=tiny-llama", "compressor.groupsize=48"], "compressor.groupsize=48 does not divide in_features=64"),
    (["model=tiny-llama", "engine.mode=cached"], "engine.mode=cached keeps per-segment vector statistics; compressor "
                                                 "'awq' searches each layer on its calibration inputs"),
])
def test_what_awq_cannot_do_fails_in_one_line_before_the_model_loads(overrides, message, monkeypatch):
    import mbs.pipeline
    from conftest import compose_run

    monkeypatch.setattr(mbs.pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        mbs.pipeline.prepare(compose_run("compressor=awq", "compressor.groupsize=32", "logger=none", *overrides))
    assert "\n" not in str(err.value)


def test_results_record_each_layer_search(tmp_path):
    from conftest import run_py

    import json

    run_py(tmp_path, "model=tiny-gemma3", "compressor=awq", "compressor.groupsize=32", "logger=none",
           "sampler.segments=20", "eval.languages=[en,sw]", "eval.max_windows=2", "analysis.layers=[]")
    results = json.loads((tmp_path / "results.json").read_text())
    layers = results["compression"]["layers"]
    assert results["compression"]["method"] == "awq"
    # Gemma 3: the MLP's scales fold into pre_feedforward_layernorm; tiny Gemma 3 has one KV head: no v->o group
    assert all(set(layer["prepared"]) == {"input_layernorm", "pre_feedforward_layernorm", "mlp.up_proj",
                                          "clip_mean_bound"} for layer in layers)
    assert all(m["bits"] == 4 and m["groupsize"] == 32 for layer in layers for m in layer["modules"].values())
    assert all(r["compressed_ppl"] > 0 for r in results["languages"])
