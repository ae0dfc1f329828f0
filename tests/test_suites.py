"""The multilingual zero-shot presets (zeroshot=<suite>, mbs/evaluate/suites.py): every task name they give the
default's 20 languages, and every variant they know, is in the installed harness's task registry (it indexes the
harness's YAML files: offline, nothing downloaded); languages without a variant are named in one line."""
import logging

import pytest
import yaml

from conftest import CONF, compose_run
from mbs.data.languages import PAPER_LANGUAGES
from mbs.evaluate.suites import SUITES, missing_line, resolve_tasks, suite_tasks, task_language
from mbs.evaluate.zeroshot import task_manager

PRESETS = sorted(p.stem for p in (CONF / "zeroshot").glob("*.yaml") if "suites" in yaml.safe_load(p.read_text()))


@pytest.fixture(scope="module")
def registry() -> set[str]:
    """The names the installed lm-evaluation-harness knows (its ~15k built-in tasks)."""
    return set(task_manager(["xnli_en"], []).all_tasks)


def test_every_suite_has_a_preset():
    assert PRESETS == sorted(SUITES)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_preset_resolves_the_default_languages_to_registered_tasks(preset, registry):
    cfg = compose_run(f"zeroshot={preset}")
    assert list(cfg.eval.languages) == list(PAPER_LANGUAGES) and list(cfg.eval.suites) == [preset]
    tasks = resolve_tasks(list(cfg.eval.tasks), list(cfg.eval.suites), list(cfg.eval.languages), warn=False)
    assert tasks and not [t for t in tasks if t not in registry]
    # each task is in one evaluated language, and the languages come in the run's order
    languages = [task_language(t) for t in tasks]
    assert set(languages) <= set(PAPER_LANGUAGES)
    assert languages == sorted(languages, key=list(PAPER_LANGUAGES).index)


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_variant_a_suite_knows_is_registered(suite, registry):
    for family in SUITES[suite].families:
        assert family.keys and not [k for k in family.keys if family.template.format(k) not in registry], family


def test_the_mapping_of_mbs_codes_to_variants():
    assert suite_tasks(["belebele"], ["zh-Hans", "zh-Hant", "ne", "sw"]) == [
        "belebele_zho_Hans", "belebele_zho_Hant", "belebele_npi_Deva", "belebele_swh_Latn"]
    assert suite_tasks(["global-piqa"], ["pt", "fr", "zh-Hant", "ar"]) == [
        "global_piqa_nonparallel_cloze_por_latn_port", "global_piqa_nonparallel_cloze_fra_latn_fran",
        "global_piqa_nonparallel_cloze_cmn_hant", "global_piqa_nonparallel_cloze_arb_arab"]
    assert suite_tasks(["xwinograd", "include"], ["ja", "zh-Hans", "zh-Hant", "en"]) == [
        "xwinograd_jp", "xwinograd_zh", "xwinograd_en", "include_base_44_japanese", "include_base_44_chinese"]
    assert suite_tasks(["okapi"], ["zh-Hans", "yo"]) == ["arc_zh", "m_mmlu_zh", "truthfulqa_zh_mc2"]
    assert len(suite_tasks(["belebele"], list(PAPER_LANGUAGES))) == 20
    assert len(suite_tasks(["global-piqa"], list(PAPER_LANGUAGES))) == 20
    assert task_language("xnli_zh") == "zh-Hans" and task_language("udhr_mc_sw") == "sw"
    assert task_language("xnli") is None and task_language("mbs_test_mc") is None


def test_languages_without_a_variant_are_named_in_one_line(caplog):
    languages = list(PAPER_LANGUAGES)
    with caplog.at_level(logging.WARNING, logger="mbs.evaluate.suites"):
        tasks = resolve_tasks(["udhr_mc_en", "xcopa_sw"], ["xcopa", "okapi"], languages)
    assert tasks[:2] == ["udhr_mc_en", "xcopa_sw"] and tasks.count("xcopa_sw") == 1
    assert [t for t in tasks if t.startswith("xcopa")] == ["xcopa_sw", "xcopa_zh", "xcopa_vi", "xcopa_id",
                                                            "xcopa_ta"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == ("zero-shot suite xcopa: no variant for en, fr, es, pt, ar, hi, bn, te, ur, ne, mr, gu, "
                        "zh-Hant, yo, ig; those are left out of its tasks")
    assert lines[1] == ("zero-shot suite okapi: no variant for ur, zh-Hant, sw, yo, ig; no arc_<code> for en; "
                        "no hellaswag_<code> for en, zh-Hans; no truthfulqa_<code>_mc2 for en; those are left out "
                        "of its tasks")
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert missing_line("belebele", languages) is None


def test_a_preset_offline_names_its_languages_then_fails_in_one_line_before_the_model_loads(tmp_path, monkeypatch,
                                                                                             caplog):
    import datasets

    import mbs.pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-datasets-cache")
    monkeypatch.setattr(mbs.pipeline, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    cfg = compose_run("model=tiny-llama", "logger=none", "sampler.segments=8", "eval.languages=[en,sw,yo]",
                      "progress=false", "analysis.layers=[]", "zeroshot=xnli")
    with caplog.at_level(logging.WARNING, logger="mbs.evaluate.suites"), \
            pytest.raises(mbs.pipeline.UserError, match=r"^eval.tasks: 'xnli_en' reads the hub dataset 'facebook/xnli'"
                                                        r" \(en\): HF_HUB_OFFLINE=1 is set") as err:
        mbs.pipeline.prepare(cfg)
    assert "\n" not in str(err.value)
    assert [r.getMessage() for r in caplog.records] == [
        "zero-shot suite xnli: no variant for yo; those are left out of its tasks"]
