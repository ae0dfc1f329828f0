"""The compressor and pipeline registries, and the one per-layer step both pipelines share."""
import copy

import pytest
import torch

from conftest import calibration, tiny
from mbs.compress.engine import EngineConfig, PipelineContext, compress_model
from mbs.compress.pruning import Magnitude, Wanda
from mbs.compress.registry import COMPRESSORS, PIPELINES, Registry, register_compressor
from mbs.compress.sparsegpt import SparseGPT
from mbs.compress.statistics import ColumnSquares
from mbs.config import SCHEMAS
from mbs.data.calibration import SegmentSource
from mbs.data.corpora import UDHRCorpus


def test_every_built_in_compressor_and_mode_is_registered():
    assert sorted(COMPRESSORS) == ["awq", "dense", "gptq", "magnitude", "rtn", "sparsegpt", "wanda"]
    assert SCHEMAS["compressor"] == {f"{name}_schema": cls for name, cls in COMPRESSORS.items()}
    assert list(PIPELINES) == ["sequential", "cached"]
    with pytest.raises(ValueError, match="^engine.mode='x' is not a mode; allowed: sequential, cached$"):
        EngineConfig(mode="x")


def test_a_taken_name_is_refused_and_a_reimported_class_replaces_itself():
    with pytest.raises(ValueError, match="compressor 'wanda' is already registered"):
        register_compressor("wanda")(type("Other", (), {}))
    registry = Registry("thing", ())
    first = type("Thing", (), {})
    registry.register("a", first)
    again = type("Thing", (), {})  # the same class defined again, as a reloaded module does
    registry.register("a", again)
    assert registry["a"] is again and list(registry) == ["a"]


def test_from_sum_merged_into_a_fresh_statistic_is_exactly_the_sum():
    total = torch.rand(7) * 1e3
    statistic = ColumnSquares(7, "cpu")
    statistic.merge(ColumnSquares.from_sum(total, 11))
    assert torch.equal(statistic.sum, total) and statistic.tokens == 11


def test_every_pipeline_is_called_the_same_way(tokenizer):
    dense = tiny("llama")
    cal = calibration(tokenizer)
    context = PipelineContext(progress=False, source=SegmentSource(tokenizer, UDHRCorpus(), 32, 0, True))
    config = EngineConfig(batch_size=2)
    direct = copy.deepcopy(dense)
    expect = compress_model(direct, Wanda(sparsity=0.5), cal, config, progress=False)
    for mode in PIPELINES:
        model = copy.deepcopy(dense)
        report = PIPELINES[mode](model, Wanda(sparsity=0.5), cal, config, context)
        assert report.sparsity == 0.5 and [layer["shared_inputs"] for layer in report.layers] == \
            [layer["shared_inputs"] for layer in expect.layers]
        assert (report.statistics_blocks is None) == (mode == "sequential")
    sequential = copy.deepcopy(dense)
    PIPELINES["sequential"](sequential, Wanda(sparsity=0.5), cal, config, context)
    assert all(torch.equal(a, b) for a, b in zip(sequential.parameters(), direct.parameters()))
    with pytest.raises(ValueError, match="engine.mode=cached keeps per-segment"):
        PIPELINES["cached"].check(SparseGPT(), dense)
    PIPELINES["sequential"].check(Magnitude(), dense)  # nothing to refuse
