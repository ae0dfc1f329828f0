"""What a run records about itself and how it is shown: run identity, absolute training shares, the console table,
and the degradation figure (--help: tests/test_command.py)."""
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from mbs.config import register
from mbs.record.identity import describe_compressor, identity
from mbs.record.results import format_share, summary, to_markdown

ROOT = Path(__file__).resolve().parents[1]
register()


def compose_run(*overrides, hydra_config=False):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_config)


@pytest.mark.parametrize("overrides, name, choices", [
    (["compressor=wanda"], "gemma3-270m · wanda 0.5 · mbs · seed 0", {"compressor": "wanda", "sampler": "mbs"}),
    (["compressor=magnitude", "sampler=uniform", "seed=3"], "gemma3-270m · magnitude 0.5 · uniform · seed 3",
     {"compressor": "magnitude", "sampler": "uniform"}),
    (["compressor=sparsegpt", "compressor.n=2", "compressor.m=4", "sampler=english"],
     "gemma3-270m · sparsegpt 2:4 · english · seed 0", {"sampler": "english"}),
    (["compressor=gptq", "compressor.groupsize=128", "model=tiny-llama"], "tiny-llama · gptq 4-bit g128 · mbs · seed 0",
     {"model": "tiny-llama", "eval": "paper-languages", "logger": "wandb", "data": "udhr"}),
])
def test_identity_names_the_chosen_options(overrides, name, choices):
    """Wanda and magnitude have the same fields, english and uniform the same schema: only the choices tell them apart."""
    cfg = compose_run(*overrides, hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        ident = identity(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert ident["name"] == name
    assert choices.items() <= ident["choices"].items()
    assert set(ident["choices"]) >= {"model", "data", "sampler", "compressor", "eval", "logger"}
    assert ident["schemas"]["compressor"].startswith("mbs.compress.")


def test_identity_without_hydra_falls_back_to_schema_names():
    ident = identity(compose_run("compressor=magnitude", "sampler=uniform"))
    assert ident["choices"]["compressor"] == "magnitude" and ident["choices"]["sampler"] == "uniformsampler"
    assert ident["schemas"]["sampler"] == "mbs.data.sampling.UniformSampler"


def test_describe_compressor():
    assert describe_compressor("dense", {}) == "dense"
    assert describe_compressor("sparsegpt", {"sparsity": 0.5, "n": 0, "m": 0, "bits": 4, "groupsize": 128}) == \
        "sparsegpt 0.5 + 4-bit g128"
    assert describe_compressor("rtn", {"bits": 3, "groupsize": -1}) == "rtn 3-bit"


def rows(shares):
    return [{"language": k, "training_share": v, "dense_ppl": 10.0, "compressed_ppl": 10.0 * math.e ** lr,
             "ratio": math.e ** lr, "log_ratio": lr, "tokens": 7} for (k, v), lr in zip(shares.items(), (0.2, 0.4, 0.6))]


def test_low_resource_is_decided_on_the_absolute_share_whatever_is_evaluated():
    """hi is 0.81% of BLOOM's distribution: low-resource next to en alone and next to sw too (renormalised over
    [en, hi] it would be 2.6% and not low-resource)."""
    two = summary(rows({"en": 0.3465, "hi": 0.0081}), 0.01)
    three = summary(rows({"en": 0.3465, "hi": 0.0081, "sw": 0.0002}), 0.01)
    assert two["low_resource_languages"] == ["hi"] and three["low_resource_languages"] == ["hi", "sw"]
    assert two["geomean_ratio"] == pytest.approx(math.exp(0.3))
    assert three["low_resource_geomean_ratio"] == pytest.approx(math.exp(0.5))
    unknown = summary(rows({"en": 0.3465, "xx": None}), 0.01)
    assert unknown["low_resource_languages"] == [] and unknown["languages_without_share"] == ["xx"]


def test_tables_are_in_percent_and_ordered_by_training_share():
    table = to_markdown(rows({"sw": 0.0002, "en": 0.3465, "xx": None}))
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["en", "sw", "xx"]
    assert "| en | 34.6 |" in table and "| sw | 0.02 |" in table and "| xx | – |" in table
    assert [format_share(f) for f in (0.34654, 0.0080749, 1.15e-5, None)] == ["34.7", "0.807", "0.00115", "–"]


def test_bad_low_resource_threshold_is_one_line():
    from mbs.config import build

    with pytest.raises(ValueError, match=r"eval.low_resource_share=1.0 must be a fraction in \(0, 1\)"):
        build(compose_run("eval.low_resource_share=1.0"))


def agg_for(conditions):
    import pandas as pd

    shares = {"en": 34.65, "hi": 0.81, "sw": 0.023}
    return pd.DataFrame([{"condition": c, "language": lang, "training_share_pct": s, "log_ratio": 0.1 * (i + 1) + j,
                          "log_ratio_ci95": math.nan, "model": "gemma3-270m", "method": "wanda 0.5", "sampler": "",
                          "dense_weights": ""}
                         for i, c in enumerate(conditions) for j, (lang, s) in enumerate(shares.items())])


@pytest.mark.parametrize("n", [3, 6])
def test_degradation_figure_bars_then_heatmap(n, tmp_path):
    """Up to 4 conditions: bars on a log ratio axis; beyond: a heatmap. Both: languages by share with the share under
    the label, a geometric-mean group, the model and method in the title, PNG and PDF."""
    from mbs.record.report import plot_degradation

    fig = plot_degradation(agg_for([f"sampler=s{i}" for i in range(n)]), tmp_path / "degradation.png")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[:3] == ["en\n35%", "hi\n0.81%", "sw\n0.023%"]
    assert "gemma3-270m · wanda 0.5" in ax.get_title()
    # the first condition's log ratios are 0.1, 1.1, 2.1: geometric means over all and over hi+sw (share < 1%)
    expected = [math.exp(0.1), math.exp(1.1), math.exp(2.1), math.exp(1.1), math.exp(1.6)]
    if n <= 4:
        assert ax.get_yscale() == "log" and labels[3:] == ["all", "share\n<1%"]
        assert [p.get_y() + p.get_height() for p in ax.patches[:5]] == pytest.approx(expected)
    else:
        assert labels[3:] == ["geo.\nmean\nall", "geo.\nmean\nshare\n<1%"]
        assert [math.exp(v) for v in ax.images[0].get_array()[0]] == pytest.approx(expected)
    assert (tmp_path / "degradation.png").stat().st_size and (tmp_path / "degradation.pdf").stat().st_size


@pytest.mark.parametrize("lo, hi", [(0.87, 1.45), (1.1, 1.3), (0.5, 40.0)])
def test_ratio_axis_labels_every_tick_it_draws(lo, hi):
    """A narrow ratio range gets round linear labels and no unlabelled log minor ticks between them (a reader took the
    bare tick below ×1 for a missing label); a wide range gets ×1, ×2, ×5, … decades."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mbs.record.report import _ratio_axis

    fig, ax = plt.subplots()
    ax.set_yscale("log")
    _ratio_axis(ax, lo, hi)
    fig.canvas.draw()
    ticks = [v for v in ax.get_yticks() if lo <= v <= hi]
    labels = {t.get_text() for t in ax.get_yticklabels() if lo <= t.get_position()[1] <= hi}
    assert len(ticks) >= 2 and all(label.startswith("×") for label in labels) and len(labels) == len(ticks)
    if hi / lo < 4:
        assert not [v for v in ax.yaxis.get_minorticklocs() if lo <= v <= hi]
    else:
        assert {"×1", "×2", "×5", "×10"} <= labels
    plt.close(fig)


def test_rows_tables_and_csv_carry_bits_per_byte():
    from mbs.evaluate.perplexity import LanguageLoss
    from mbs.record.results import COLUMNS, language_rows, to_csv

    dense = {"en": LanguageLoss(700.0, 100, 400), "zh-Hans": LanguageLoss(900.0, 100, 250)}
    compressed = {"en": LanguageLoss(770.0, 100, 400), "zh-Hans": LanguageLoss(990.0, 100, 250)}
    rows_ = language_rows(dense, compressed, {"en": 0.5, "zh-Hans": 0.2})
    for r, d, c in zip(rows_, dense.values(), compressed.values()):
        assert r["bytes"] == d.bytes and r["tokens"] == d.tokens
        assert r["dense_bpb"] == pytest.approx(d.nll / (math.log(2) * d.bytes))
        assert r["compressed_bpb"] == pytest.approx(c.nll / (math.log(2) * d.bytes))
        # per byte, the two languages' losses differ from per token by their tokens per byte
        per_byte = r["log_ratio"] * r["tokens"] / (math.log(2) * r["bytes"])
        assert r["compressed_bpb"] - r["dense_bpb"] == pytest.approx(per_byte)
    table = to_markdown(rows_)
    assert "| dense bpb | compressed bpb | tokens | bytes |" in table.splitlines()[0]
    assert f"| {rows_[0]['dense_bpb']:.4f} | {rows_[0]['compressed_bpb']:.4f} | 100 | 400 |" in table
    header, first = to_csv(rows_, "abc").splitlines()[:2]
    assert header.split(",") == ["experiment_id", *COLUMNS]
    assert first.split(",")[0] == "abc" and first.split(",")[1 + COLUMNS.index("bytes")] == "400"
    assert [r["low_resource"] for r in rows_] == [False, False] and rows_[0]["calibration_segments"] == 0
    old = rows({"en": 0.5})  # results.json written before bytes were recorded
    assert "| 1.221 | 0.200 | – | – | 7 | – |" in to_markdown(old)
    assert to_csv(old).splitlines()[1].endswith(",,,7,,,")


def test_run_result_reads_old_and_new_results_json_and_writes_them_back_unchanged():
    from mbs.record.results import SCHEMA_VERSION, RunResult

    old = {"experiment_id": "x", "languages": [], "summary": {}, "similarity": None, "timings": {"total_s": 1.0},
           "some_later_key": [1, 2]}
    result = RunResult.from_json(old)
    assert result.schema_version == 1 and result.extra == {"some_later_key": [1, 2]}
    assert {k: v for k, v in result.to_json().items() if k in old} == old
    assert "zeroshot" not in result.to_json() and "export" not in result.to_json()  # optional keys left out
    new = RunResult(schema_version=SCHEMA_VERSION, experiment_id="y", zeroshot={"results": []})
    assert RunResult.from_json(new.to_json()) == new
