"""Accuracy retention beside perplexity retention per language, in the sweep report and mbs.analyze, on a hand-made
sweep directory with known numbers (mbs/record/accuracy_retention.py)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from mbs.analyze.retention import analyze
from mbs.record.accuracy_retention import retention_by_language
from mbs.record.jobs import collect_jobs
from mbs.record.report import build_report

LANGUAGES = {"en": 0.3, "fr": 0.1, "hi": 0.05, "sw": 0.01, "yo": 0.001}  # training shares
# condition a: perplexity retention (dense / compressed ppl) and accuracy retention per language, by design
PPL_A = {"en": 0.9, "fr": 0.8, "hi": 0.7, "sw": 0.6, "yo": 0.5}
ACC_A = {"en": 0.95, "fr": 0.9, "hi": 0.7, "sw": 0.8}  # yo: no zero-shot task in it


def _row(task, metric, dense, compressed):
    return {"task": task, "metric": metric, "n": 100, "dense": dense, "dense_stderr": 0.01, "compressed": compressed,
            "compressed_stderr": 0.01, "difference": compressed - dense, "difference_stderr": 0.005}


def zeroshot_rows(acc: dict[str, float]) -> list[dict]:
    """Per language one or two tasks whose mean accuracy retention is acc[language]; rows that must not count."""
    rows = [_row("xnli", "acc", 0.5, 0.1)]  # a group over languages: no one language
    for lang, keep in acc.items():
        if lang == "en":  # two tasks, dense 0.5 and 0.7 (mean 0.6); compressed mean 0.6 * keep
            rows += [_row("xnli_en", "acc", 0.5, 0.5 * keep), _row("xstorycloze_en", "acc", 0.7, 0.7 * keep),
                     _row("xnli_en", "acc_norm", 0.5, 0.01)]  # not the primary metric
        elif lang == "sw":  # a generation task: exact match (flexible extract)
            rows += [_row("mgsm_direct_sw", "exact_match,flexible-extract", 0.4, 0.4 * keep),
                     _row("mgsm_direct_sw", "exact_match,remove_whitespace", 0.2, 0.0)]
        else:
            rows.append(_row({"fr": "belebele_fra_Latn", "hi": "global_mmlu_full_hi"}[lang], "acc", 0.6, 0.6 * keep))
    rows.append(_row("global_mmlu_full_hi_anatomy", "acc", 0.9, 0.0))  # a subject of the group above: not counted
    return rows


def write_job(root: Path, name: str, seed: int, ppl: dict[str, float], acc: dict[str, float]) -> None:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- sampler={name.split('_')[0]}\n- seed={seed}\n")
    rows = [{"language": lang, "share": 0.2, "training_share": share, "dense_ppl": 10.0,
             "compressed_ppl": 10.0 / ppl[lang], "ratio": 1 / ppl[lang], "log_ratio": -math.log(ppl[lang]),
             "tokens": 9} for lang, share in LANGUAGES.items()]
    results = {"experiment_id": f"{name}-{seed}", "config": {"seed": seed}, "model": {"name": "toy"},
               "languages": rows, "compression": {"sparsity": 0.5},
               "zeroshot": {"harness": "lm_eval 0.4.13", "tasks": [], "results": zeroshot_rows(acc)}}
    (job / "results.json").write_text(json.dumps(results))


@pytest.fixture
def sweep(tmp_path):
    write_job(tmp_path, "a_0", 0, PPL_A, ACC_A)
    # condition b: two seeds, zero-shot tasks in en and sw only; per language the seeds are averaged
    write_job(tmp_path, "b_0", 0, {**PPL_A, "en": 0.5, "sw": 0.4}, {"en": 0.8, "sw": 0.6})
    write_job(tmp_path, "b_1", 1, {**PPL_A, "en": 0.7, "sw": 0.6}, {"en": 0.9, "sw": 0.7})
    return tmp_path


def test_accuracy_and_perplexity_retention_per_language(sweep):
    df = retention_by_language(collect_jobs(sweep)).set_index(["condition", "language"])
    a = df.loc["sampler=a"]
    assert list(a.index) == ["en", "fr", "hi", "sw"]  # yo has perplexity only: not a point
    assert a.loc["en", "tasks"] == 2 and a.loc["en", "dense_accuracy"] == pytest.approx(0.6)
    for lang, keep in ACC_A.items():
        assert a.loc[lang, "accuracy_retention"] == pytest.approx(keep)
        assert a.loc[lang, "perplexity_retention"] == pytest.approx(PPL_A[lang])
    b = df.loc["sampler=b"]
    assert list(b.index) == ["en", "sw"] and (b["jobs"] == 2).all()
    assert b.loc["en", "accuracy_retention"] == pytest.approx(0.85)
    assert b.loc["en", "perplexity_retention"] == pytest.approx(0.6)
    assert b.loc["sw", "accuracy_retention"] == pytest.approx(0.65)


def expected_sentence() -> str:
    x, y = [PPL_A[k] for k in ACC_A], list(ACC_A.values())
    # ranks 4 3 2 1 vs 4 3 1 2: rho = 1 - 6 * (0 + 0 + 1 + 1) / (4 * (16 - 1)) = 0.8; Pearson by numpy
    return (f"sampler=a: Spearman ρ = 0.80, Pearson r = {np.corrcoef(x, y)[0, 1]:.2f} (n = 4 languages)")


def test_the_report_and_the_analysis_show_both_and_their_correlation(sweep):
    report = build_report(sweep, sweep / "report")
    md = (sweep / "report" / "report.md").read_text()
    assert "## Accuracy retention beside perplexity retention, by language" in md
    assert "| sampler=a | en | 2 | 60.0 | 57.0 | 0.950 | 0.900 |" in md
    assert "| sampler=b | en | 2 | 60.0 | 51.0 | 0.850 | 0.600 |" in md
    assert f"- {expected_sentence()}" in md
    assert "- sampler=b: no correlation (fewer than 3 languages; n = 2 languages)" in md
    assert "- Evaluated for perplexity but in no zero-shot task (not in the table): yo" in md
    assert sweep / "report" / "accuracy_retention.csv" in report.files

    result = analyze(sweep, sweep / "analysis", n_resamples=99)
    md = (sweep / "analysis" / "analysis.md").read_text()
    assert "| sampler=a | fr | 1 | 60.0 | 54.0 | 0.900 | 0.800 |" in md and f"- {expected_sentence()}" in md
    assert sweep / "analysis" / "accuracy_retention.csv" in result.files


def test_no_section_without_zero_shot_tasks(tmp_path):
    write_job(tmp_path, "a_0", 0, PPL_A, {})
    report = build_report(tmp_path, tmp_path / "report")
    assert "Accuracy retention" not in (tmp_path / "report" / "report.md").read_text()
    assert not any(p.name == "accuracy_retention.csv" for p in report.files)
