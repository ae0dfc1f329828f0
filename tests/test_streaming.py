"""Streaming models larger than memory (engine.stream, engine.max_memory; mbs/models/streaming.py): the streamed
run gives bit-identical weights, masks, statistics records and perplexities to the in-memory run; a killed run's
offload files are never trusted; bad sizes and caps fail in one line before the model loads."""
import json

import pytest
import torch

import mbs.pipeline
from conftest import compose_run, run_py
from mbs.compress.engine import EngineConfig, compress_model, parse_size
from mbs.compress.registry import COMPRESSORS
from mbs.data.calibration import build_calibration
from mbs.data.corpora import UDHRCorpus
from mbs.evaluate.perplexity import evaluate_languages
from mbs.evaluate.streamed import evaluate_streamed
from mbs.fingerprint import weights_fingerprint
from mbs.models.adapter import Adapter
from mbs.models.loading import load_model, load_streamed
from mbs.models.spec import ModelSpec
from mbs.models.streaming import LAYER_FILE, OffloadedRecord, gb, is_streamed, layer_store

TINY = ["model=tiny-llama", "sampler.segments=12", "eval.languages=[en,sw,fr]", "eval.max_windows=2",
        "logger=none", "progress=false"]


@pytest.fixture(scope="module")
def data(tokenizer):
    from mbs.api import evaluation_windows

    calibration = build_calibration(tokenizer, UDHRCorpus(), {"en": 3, "sw": 2, "fr": 2}, 32, 0, True)
    windows = evaluation_windows(tokenizer, UDHRCorpus(), ["en", "sw"], seqlen=64, prepend_bos=True, max_windows=3)
    return calibration, windows


def tiny_spec(arch: str, dtype: str = "float32", **kw) -> ModelSpec:
    return ModelSpec(name=f"tiny-{arch}", source="tiny", tiny_arch=arch, dtype=dtype, seqlen=64, prepend_bos=True,
                     **kw)


def compressor(name: str):
    if name == "wanda-owl":  # a layer profile: a dense pre-pass over every layer first
        return COMPRESSORS["wanda"](sparsity=0.6, layer_sparsity="owl", owl_lambda=0.2)
    return COMPRESSORS[name](groupsize=32) if name in ("gptq", "awq") else COMPRESSORS[name]()


def losses(model, windows, streamed: bool, dtype: str = "float32-head"):
    if streamed:
        return evaluate_streamed(model, windows, "cpu", "cpu", batch_size=2, chunk_tokens=16, progress=False,
                                 dtype=dtype)
    return evaluate_languages(model, windows, "cpu", batch_size=2, chunk_tokens=16, progress=False, dtype=dtype)


def assert_same_losses(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].nll, a[k].tokens) == (b[k].nll, b[k].tokens), k  # exactly, not within a tolerance


def without_seconds(layers):
    return [{k: v for k, v in layer.items() if k != "seconds"} for layer in layers]


@pytest.mark.parametrize("arch, method, dtype, save_format", [
    ("llama", "wanda", "float32", None), ("llama", "gptq", "float32", "compressed-tensors"),
    ("bloom", "wanda", "bfloat16", "dense"), ("bloom", "gptq", "float32", None),
    ("gemma3", "gptq", "bfloat16", "compressed-tensors"), ("gpt2", "sparsegpt", "float32", None),
    ("llama", "awq", "float32", "compressed-tensors"), ("qwen2", "wanda-owl", "float32", None),
])
def test_streamed_equals_in_memory_bit_for_bit(arch, method, dtype, save_format, data, tokenizer, tmp_path):
    """Weights, masks, statistics records, GPTQ grids and perplexities; with ``save_format``, also the exported
    checkpoint (save_model with engine.stream=true: written layer by layer from the offload folder)."""
    calibration, windows = data
    spec = tiny_spec(arch, dtype)
    memory, streamed = load_model(spec), load_streamed(spec, tmp_path / "offload")
    assert is_streamed(streamed) and all(p.is_meta for p in Adapter(streamed).layers.parameters())
    assert weights_fingerprint(streamed) == weights_fingerprint(memory)
    assert_same_losses(losses(memory, windows, False), losses(streamed, windows, True))

    a, b = compressor(method), compressor(method)
    report_a = compress_model(memory, a, calibration, EngineConfig(), progress=False)
    report_b = compress_model(streamed, b, calibration, EngineConfig(), progress=False)
    assert without_seconds(report_a.layers) == without_seconds(report_b.layers)
    assert all(p.is_meta for p in Adapter(streamed).layers.parameters())  # freed after their turn
    # GPTQ's scales, zero points and group maps: streamed, in the offload folder (memory must not grow with depth)
    assert all(isinstance(r, OffloadedRecord) for r in getattr(b, "records", {}).values())
    for key in getattr(a, "records", {}):
        for field, value in a.records[key].items():
            other = b.records[key][field]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (key, field)

    from safetensors.torch import load_file

    for i, layer in enumerate(Adapter(memory).layers):
        written = load_file(tmp_path / "offload" / LAYER_FILE.format(i))
        for name, weight in layer.named_parameters():
            assert torch.equal(written[name], weight), (i, name)
            assert torch.equal(written[name] == 0, weight == 0), (i, name)  # the masks
    if save_format:
        assert_same_export(memory, streamed, a, b, tokenizer, save_format, tmp_path)
    assert_same_losses(losses(memory, windows, False), losses(streamed, windows, True))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_residual_similarity_vectors_stream_bit_for_bit(arch, data, tmp_path):
    from mbs.analyze.similarity import language_vectors

    calibration, _ = data
    spec = tiny_spec(arch, "bfloat16")
    memory, streamed = load_model(spec), load_streamed(spec, tmp_path / "offload")
    a = language_vectors(memory, calibration, [0, 1], EngineConfig(batch_size=2), "residual")
    b = language_vectors(streamed, calibration, [0, 1], EngineConfig(batch_size=2), "residual")
    assert a.keys() == b.keys() == {0, 1}
    for i in a:
        assert a[i].keys() == b[i].keys() == set(calibration.segments)
        assert all(torch.equal(a[i][k], b[i][k]) for k in a[i]), i
    assert all(p.is_meta for p in Adapter(streamed).layers.parameters())


def stored(directory) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint directory holds, by key, whatever its sharding."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def assert_same_export(memory, streamed, a, b, tokenizer, save_format, tmp_path):
    """The streamed export holds the in-memory export's tensors and config (tied embeddings once), leaves no layer in
    memory, and the plain from_pretrained call loads the weights that were evaluated."""
    from transformers import AutoModelForCausalLM

    from mbs.record.export import export

    info_a = export(memory, tmp_path / "memory", a, tokenizer, save_format)
    info_b = export(streamed, tmp_path / "streamed", b, tokenizer, save_format)
    assert all(p.is_meta for p in Adapter(streamed).layers.parameters())
    tensors_a, tensors_b = stored(tmp_path / "memory"), stored(tmp_path / "streamed")
    assert tensors_a.keys() == tensors_b.keys()
    for key, value in tensors_a.items():
        assert value.dtype == tensors_b[key].dtype and torch.equal(value, tensors_b[key]), key
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("memory", "streamed")]
    assert configs[0] == configs[1]
    for key in ("format", "quantized_modules", "dense_bytes", "embedding_bytes", "dtype"):
        assert info_a[key] == info_b[key], key
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()
    for name, weight in memory.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name].to(weight.dtype), weight), name


def test_float32_evaluation_and_the_dense_compressor_stream_too(data, tmp_path):
    calibration, windows = data
    spec = tiny_spec("qwen2", "bfloat16")
    memory, streamed = load_model(spec), load_streamed(spec, tmp_path / "offload")
    assert_same_losses(losses(memory, windows, False, "float32"), losses(streamed, windows, True, "float32"))
    # the float32 evaluation gave every weight back its dtype: the layers still stream in bf16
    report_a = compress_model(memory, compressor("dense"), calibration, EngineConfig(), progress=False)
    report_b = compress_model(streamed, compressor("dense"), calibration, EngineConfig(), progress=False)
    assert without_seconds(report_a.layers) == without_seconds(report_b.layers)
    assert not list((tmp_path / "offload").glob("layer-*"))  # nothing edited, nothing written
    assert_same_losses(losses(memory, windows, False, "model"), losses(streamed, windows, True, "model"))


def test_a_local_safetensors_checkpoint_streams_as_from_pretrained_loads_it(data, tmp_path):
    """model=hf / a local directory: the skeleton is built from its config.json (buffers as from_pretrained makes
    them), the weights read from its safetensors shards; tied embeddings stay tied."""
    from mbs.models.tiny import tiny_model

    calibration, windows = data
    tiny_model("gemma3", {}, dtype=torch.bfloat16).save_pretrained(tmp_path / "model", max_shard_size="100KB")
    assert len(list((tmp_path / "model").glob("*.safetensors"))) > 1  # shards, read through their index
    spec = ModelSpec(name="mine", source="hub", path=str(tmp_path / "model"), seqlen=64, dtype="bfloat16")
    memory, streamed = load_model(spec), load_streamed(spec, tmp_path / "offload")
    assert streamed.get_output_embeddings().weight is streamed.get_input_embeddings().weight
    for (name, a), (_, b) in zip(sorted(memory.named_buffers()), sorted(streamed.named_buffers())):
        assert torch.equal(a, b) and a.dtype == b.dtype, name
    assert weights_fingerprint(streamed) == weights_fingerprint(memory)
    compress_model(memory, compressor("wanda"), calibration, EngineConfig(), progress=False)
    compress_model(streamed, compressor("wanda"), calibration, EngineConfig(), progress=False)
    assert_same_losses(losses(memory, windows, False), losses(streamed, windows, True))


@pytest.mark.parametrize("arch, method", [("mixtral", "wanda"), ("qwen2_moe", "gptq"), ("gemma3_multimodal", "wanda")])
def test_checkpoints_transformers_converts_on_load_stream_bit_for_bit(arch, method, data, tmp_path):
    """Per-expert MoE weights that transformers fuses on load (Mixtral, Qwen2-MoE), and Gemma 3 multimodal's renamed
    text model: each streamed layer is converted by transformers' own loading code, so the results are the in-memory
    ones."""
    calibration, windows = data
    spec = tiny_spec(arch)
    memory, streamed = load_model(spec), load_streamed(spec, tmp_path / "offload")
    assert layer_store(streamed).converted or arch.startswith("gemma")  # the MoE layers go through the conversion
    assert weights_fingerprint(streamed) == weights_fingerprint(memory)
    assert all(p.is_meta for p in Adapter(streamed).layers.parameters())
    report_a = compress_model(memory, compressor(method), calibration, EngineConfig(), progress=False)
    report_b = compress_model(streamed, compressor(method), calibration, EngineConfig(), progress=False)
    assert without_seconds(report_a.layers) == without_seconds(report_b.layers)
    assert_same_losses(losses(memory, windows, False), losses(streamed, windows, True))


def test_a_checkpoint_missing_weights_is_refused_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    from mbs.models.loading import weights_directory

    source = weights_directory(tiny_spec("llama"))
    local = tmp_path / "local"
    local.mkdir()
    (local / "config.json").write_text((source / "config.json").read_text())
    state = load_file(next(source.glob("*.safetensors")))
    save_file({k: v for k, v in state.items() if "layers.1.mlp" not in k}, local / "model.safetensors")
    with pytest.raises(ValueError, match=r"engine.stream=true: 3 weight\(s\) of the model are stored nowhere") as err:
        load_streamed(ModelSpec(name="local", source="hub", path=str(local), dtype="float32", seqlen=64),
                      tmp_path / "offload")
    assert "\n" not in str(err.value)


# -- a killed run -----------------------------------------------------------------------------------------------------

def test_files_a_killed_run_left_are_removed_not_read(data, tmp_path):
    calibration, windows = data
    offload = tmp_path / "offload"
    offload.mkdir()
    (offload / LAYER_FILE.format(0)).write_bytes(b"half a layer")  # as if complete, from another run
    (offload / f".{LAYER_FILE.format(1)}.tmp4242").write_bytes(b"a killed write")
    spec = tiny_spec("llama")
    memory, streamed = load_model(spec), load_streamed(spec, offload)
    assert sorted(p.name for p in offload.iterdir()) == []
    compress_model(memory, compressor("wanda"), calibration, EngineConfig(), progress=False)
    compress_model(streamed, compressor("wanda"), calibration, EngineConfig(), progress=False)
    assert_same_losses(losses(memory, windows, False), losses(streamed, windows, True))


def test_a_write_killed_midway_leaves_no_layer_file(data, tmp_path, monkeypatch):
    import safetensors.torch

    calibration, _ = data
    streamed = load_streamed(tiny_spec("llama"), tmp_path / "offload")

    def killed(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # part of the file, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        compress_model(streamed, compressor("wanda"), calibration, EngineConfig(), progress=False)
    assert list((tmp_path / "offload").iterdir()) == []


KILLED = """
import os, signal, sys
import safetensors.torch
from mbs.compress.engine import EngineConfig, compress_model
from mbs.compress.registry import COMPRESSORS
from mbs.data.calibration import build_calibration
from mbs.data.corpora import UDHRCorpus
from mbs.models.loading import load_streamed, load_tokenizer
from mbs.models.spec import ModelSpec

spec = ModelSpec(name="tiny-llama", source="tiny", tiny_arch="llama", dtype="float32", seqlen=64, prepend_bos=True)
calibration = build_calibration(load_tokenizer(spec), UDHRCorpus(), {"en": 3, "sw": 2, "fr": 2}, 32, 0, True)
model = load_streamed(spec, sys.argv[1])
save, written = safetensors.torch.save_file, []

def dies_in_the_second_write(tensors, filename, *args, **kwargs):
    if written:
        with open(filename, "wb") as f:
            f.write(b"\\0" * 100)
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    written.append(filename)
    save(tensors, filename, *args, **kwargs)

safetensors.torch.save_file = dies_in_the_second_write
compress_model(model, COMPRESSORS["wanda"](), calibration, EngineConfig(), progress=False)
"""


def test_a_run_killed_while_writing_a_layer_is_recovered_by_the_next(data, tmp_path):
    """A real SIGKILL in the middle of writing layer 1: layer 0's file and layer 1's temporary are left; the next
    run trusts neither, and gives the in-memory result."""
    import os
    import subprocess
    import sys

    calibration, windows = data
    offload = tmp_path / "offload"
    proc = subprocess.run([sys.executable, "-c", KILLED, str(offload)], capture_output=True, text=True, timeout=120,
                          env={**os.environ})
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = sorted(p.name for p in offload.iterdir())
    assert left[0].startswith(f".{LAYER_FILE.format(1)}.tmp") and left[1:] == [LAYER_FILE.format(0)], left
    spec = tiny_spec("llama")
    memory, streamed = load_model(spec), load_streamed(spec, offload)
    assert list(offload.iterdir()) == []
    compress_model(memory, compressor("wanda"), calibration, EngineConfig(), progress=False)
    compress_model(streamed, compressor("wanda"), calibration, EngineConfig(), progress=False)
    assert_same_losses(losses(memory, windows, False), losses(streamed, windows, True))


def test_an_offloaded_layer_changed_on_disk_is_not_used(data, tmp_path):
    calibration, windows = data
    streamed = load_streamed(tiny_spec("llama"), tmp_path / "offload")
    compress_model(streamed, compressor("wanda"), calibration, EngineConfig(), progress=False)
    path = layer_store(streamed).path(1)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(RuntimeError, match="changed on disk since this run wrote it"):
        losses(streamed, windows, True)


# -- through run.py ---------------------------------------------------------------------------------------------------

def test_run_py_streamed_gives_the_in_memory_results(tmp_path):
    for name, extra in (("memory", []), ("streamed", ["engine.stream=true"])):
        run_py(tmp_path / name, *TINY, "compressor=gptq", "compressor.groupsize=32", "force=true", *extra)
    a, b = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("memory", "streamed"))
    assert a["experiment_id"] == b["experiment_id"]  # stream changes no number
    assert a["languages"] == b["languages"] and a["summary"] == b["summary"]
    assert without_seconds(a["compression"]["layers"]) == without_seconds(b["compression"]["layers"])
    assert a["similarity"] == b["similarity"]
    assert b["compression"]["stream"] is True and "stream" not in a["compression"]
    assert a["dense_baseline"]["perplexity"] == b["dense_baseline"]["perplexity"] == "computed"
    assert not (tmp_path / "streamed" / "offload").exists()  # removed once the compressed layers were evaluated


def test_run_py_streamed_saves_the_model_the_in_memory_run_saves(tmp_path):
    for name, extra in (("memory", []), ("streamed", ["engine.stream=true"])):
        run_py(tmp_path / name, *TINY, "compressor=gptq", "compressor.groupsize=32", "force=true", "save_model=true",
               *extra)
    a, b = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("memory", "streamed"))
    same = ("format", "quantized_modules", "bits", "kept_dense", "dtype", "dense_bytes", "embedding_bytes")
    assert {k: a["export"][k] for k in same} == {k: b["export"][k] for k in same}
    # the same tensors; only the shards' headers differ (one shard per layer when streamed)
    assert b["export"]["weights_bytes"] == pytest.approx(a["export"]["weights_bytes"], rel=0.01)
    tensors_a, tensors_b = stored(tmp_path / "memory" / "model"), stored(tmp_path / "streamed" / "model")
    assert tensors_a.keys() == tensors_b.keys() and all(torch.equal(v, tensors_b[k]) for k, v in tensors_a.items())
    assert (tmp_path / "streamed" / "model" / "README.md").is_file()  # the model card


def test_a_failed_streamed_run_removes_its_offloaded_layers_and_nothing_else(tmp_path, monkeypatch):
    calls = []

    def fails_after_compression(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the compressed evaluation: every layer is offloaded by now
            assert len(list((tmp_path / "run" / "offload").glob("layer-*.safetensors"))) == 3
            raise RuntimeError("out of memory")
        return evaluate_streamed(*args, **kwargs)

    (tmp_path / "run" / "offload").mkdir(parents=True)
    (tmp_path / "run" / "offload" / "notes.txt").write_text("mine")
    monkeypatch.setattr(mbs.pipeline, "evaluate_streamed", fails_after_compression)
    with pytest.raises(RuntimeError, match="out of memory"):
        mbs.pipeline.run(compose_run(*TINY, "engine.stream=true", "force=true"), tmp_path / "run")  # no cached dense
    assert [p.name for p in (tmp_path / "run" / "offload").iterdir()] == ["notes.txt"]


# -- engine.max_memory and engine.stream ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, size", [("8GB", 8 * 10**9), ("1.5GiB", 3 * 2**29), ("512 MB", 512 * 10**6),
                                        ("100b", 100), (None, None)])
def test_sizes(text, size):
    assert parse_size(text, "engine.max_memory") == size


@pytest.mark.parametrize("text", ["8", "lots", "8 GBs", "-1GB", "0GB", 8])
def test_a_bad_size_is_refused_in_one_line(text):
    with pytest.raises(ValueError, match=r"engine.max_memory=.* (is not a size|must be more than 0)") as err:
        EngineConfig(max_memory=text)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override, line", [
    ("engine.stream=maybe", "mbs: error: engine.stream='maybe' is not a boolean (true or false)"),
    ("engine.max_memory=lots", "mbs: error: engine.max_memory='lots' is not a size; allowed: a number with a unit"),
])
def test_run_py_refuses_bad_stream_settings_in_one_line(tmp_path, override, line):
    proc = run_py(tmp_path / "run", "model=tiny-llama", "dry_run=true", override, check=False)
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(line), proc.stderr


def _plan():
    return mbs.pipeline.prepare(compose_run(*TINY, "engine.stream=true")).memory


def test_a_cap_below_one_layer_and_the_activations_fails_before_the_model_loads(tmp_path, monkeypatch):
    least = _plan().streamed

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mbs.pipeline, "load_model", no_loading)
    monkeypatch.setattr(mbs.pipeline, "load_streamed", no_loading)
    cfg = compose_run(*TINY, f"engine.max_memory={least - 1}B")
    with pytest.raises(mbs.pipeline.UserError) as err:
        mbs.pipeline.run(cfg, tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message and f"engine.max_memory={least - 1}B is below the least" in message
    assert f"allow at least {gb(least)}" in message and "largest decoder layer" in message
    assert not (tmp_path / "run" / "results.json").exists()


def test_streaming_is_chosen_when_the_model_would_not_fit_the_cap():
    plan = _plan()
    assert plan.streamed < plan.in_memory
    between = (plan.streamed + plan.in_memory) // 2
    assert mbs.pipeline.prepare(compose_run(*TINY, f"engine.max_memory={between}B")).stream
    assert not mbs.pipeline.prepare(compose_run(*TINY, f"engine.max_memory={plan.in_memory}B")).stream
    assert not mbs.pipeline.prepare(compose_run(*TINY)).stream
    assert mbs.pipeline.prepare(compose_run(*TINY, "engine.stream=true")).stream


@pytest.mark.parametrize("override, what", [
    ("engine.mode=cached", "engine.mode=cached"),
    ("risk.predict=true", "risk.predict=true"),
])
def test_what_a_streamed_run_cannot_do_yet_is_refused_in_one_line(override, what):
    with pytest.raises(mbs.pipeline.UserError, match=f"engine.stream=true, and a streamed run cannot take {what}"
                       ) as err:
        mbs.pipeline.prepare(compose_run(*TINY, "engine.stream=true", override))
    assert "\n" not in str(err.value)


def test_dry_run_states_the_memory_plan():
    out = mbs.pipeline.plan_text(mbs.pipeline.prepare(compose_run(*TINY, "engine.stream=true")))
    assert "streamed (largest decoder layer" in out and "streams its decoder layers from disk" in out
