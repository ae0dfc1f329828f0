import re

import pytest

from conftest import CONF, compose_run
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import OmegaConfBaseException

from mbs.config import build, register
from mbs.pipeline import plan

GROUPS = ("model", "data", "sampler", "compressor", "eval", "logger")

register()


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_builds(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "sampler" and option == "counts":
        overrides.append("++sampler.per_language={en: 4, sw: 4}")
    if group == "sampler" and option == "optimized":  # the file python -m mbs.mixture writes
        (tmp_path / "mixture.yaml").write_text("per_language: {en: 4, sw: 4}\n")
        overrides.append(f"sampler.path={tmp_path / 'mixture.yaml'}")
    if group == "data" and option == "local":
        for code in ("en", "sw"):
            (tmp_path / f"{code}.txt").write_text("some text\n" * 20)
        overrides += [f"data.path={tmp_path}", "eval.languages=[en,sw]"]
    if group == "model" and option == "hf":  # the user names the model
        overrides.append("model.path=org/Some-Model")
    if option == "fineweb2":  # no zh-Hant: its cmn_Hani subset mixes both scripts
        overrides.append("eval.languages=[en,sw,zh-Hans]")
    if option == "wikitext2":  # English only
        overrides += ["eval=wikitext2", "sampler=english"] if group == "data" else ["sampler=english"]
    cfg = compose_run(*overrides)
    run = build(cfg)
    assert run.model.distribution or run.model.distribution_estimate, "every model states its distribution or a proxy"
    if group != "model":
        assert plan(run)


def test_distributions_state_their_source():
    for option in options("model"):
        model = build(compose_run(f"model={option}", *(["model.path=org/x"] if option == "hf" else []))).model
        assert model.distribution_source
        if model.name.startswith("bloom-"):
            assert not model.distribution_is_proxy and model.distribution["en"] == 30.04
        else:
            assert model.distribution_is_proxy
            assert "PROXY" in model.distribution_source or "ESTIMATE" in model.distribution_source


@pytest.mark.parametrize("override", [
    "compressor.sparsty=0.5",  # misspelt key
    "compressor.sparsity=half",  # wrong type
    "model.seqlen=long",
    "eval.batchsize=4",
    "model=no-such-model",
    "compressor=no-such-method",
])
def test_bad_override_fails_at_composition(override):
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException, HydraException)):
        compose_run(override)


@pytest.mark.parametrize("overrides, message", [
    (["eval.languages=[en,xx]"], "unknown language code 'xx': not a BCP-47 language tag"),
    (["eval.languages=[en,ki]"], "has no text for ki; it has: "),
    (["sampler=monolingual", "sampler.language=tum"], "has no text for tum"),
    (["compressor.sparsity=1.0"], "compressor.sparsity=1.0 is outside [0, 1)"),
    (["compressor.sparsity=-0.1"], "outside [0, 1)"),
    (["compressor.n=1", "compressor.m=4"], "ratio 0.25; allowed: 0.5"),
    (["compressor.n=4", "compressor.m=4"], "needs 0 < N < M"),
    (["sampler.segments=10"], "10 segments cannot give 20 languages at least 1 each"),
    (["sampler=counts", "++sampler.per_language={en: 0, sw: 0}"], "positive sum"),
    (["sampler=uniform", "sampler.languages=[en,sw]", "model.distribution.sw=0"], None),
    (["model.dtype=float8"], "model.dtype='float8' is not one of"),
    (["engine.device=cuda:0"], "no CUDA device"),
    # a setting the chosen engine.mode ignores, and a limit the harness would truncate
    (["engine.statistics_pool=8"], "engine.statistics_pool=8 applies only to engine.mode=cached"),
    (["engine.mode=cached", "engine.per_language_statistics=true"],
     "engine.per_language_statistics=true applies only to engine.mode=sequential"),
    (["engine.mode=cached", "engine.statistics_pool=8"], None),
    (["eval.zeroshot.limit=1.5", "zeroshot=udhr"], "eval.zeroshot.limit=1.5 is neither a count"),
    (["eval.zeroshot.limit=0.5", "zeroshot=udhr"], None),
    (["eval.zeroshot.limit=5"], "eval.zeroshot.limit=5.0 applies only with zero-shot tasks, and eval.tasks is empty"),
    (["eval.suites=[xnli,nope]"], "eval.suites: unknown suite(s) 'nope'; allowed: belebele, global-mmlu"),
    (["zeroshot=xwinograd", "eval.languages=[sw,yo]"],
     "eval.suites: xwinograd has no variant in any evaluated language (sw, yo)"),
    (["eval.suites=[xnli,xnli]"], "eval.suites repeats xnli"),
    (["zeroshot=xcopa", "eval.zeroshot.limit=5"], None),
    (["compressor=awq", "compressor.n_grid=0"], "compressor.n_grid=0 must be >= 1"),
    (["compressor=awq", "compressor.max_shrink=1.0"], "compressor.max_shrink=1.0 must be in [0, 1)"),
    (["compressor=awq", "compressor.clip_tokens=0"], "compressor.clip_tokens=0 must be >= 1"),
    (["compressor=awq", "compressor.bits=1"], "compressor.bits=1 is not allowed; allowed: 2-8"),
    (["compressor=awq"], None),
    (["save_format=dense"], "save_format=dense applies only with save_model=true"),
    (["save_format=dense", "save_model=true"], None),
    # each evaluation setting named with what it allows
    (["eval.batch_size=0"], "eval.batch_size=0 is out of range; allowed: an integer >= 1"),
    (["eval.chunk_tokens=0"], "eval.chunk_tokens=0 is out of range; allowed: an integer >= 1"),
    (["eval.max_windows=-1"], "eval.max_windows=-1 is out of range; allowed: an integer >= 0"),
])
def test_bad_values_fail_before_the_model_loads(overrides, message):
    cfg = compose_run(*overrides)
    if message is None:  # a control: this one is fine
        plan(build(cfg))
        return
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        plan(build(cfg))
    assert "\n" not in str(err.value)


def test_zero_sum_distribution_is_refused():
    cfg = compose_run("sampler.languages=[sw,yo]", "model.distribution={sw: 0, yo: 0}")
    with pytest.raises(ValueError, match="sum to zero over sw, yo"):
        plan(build(cfg))


@pytest.mark.parametrize("override, message", [
    ("+compressor.sparsty=0.9", "unknown key compressor.sparsty: did you mean compressor.sparsity"),
    ("+engine.devcie=cuda", "unknown key engine.devcie: did you mean engine.device?"),
    ("+sampler.segmnts=8", "unknown key sampler.segmnts: did you mean sampler.segments?"),
    ("+model.seqln=32", "unknown key model.seqln: did you mean model.seqlen?"),
    ("+eval.zeroshot.limt=3", "unknown key eval.zeroshot.limt: did you mean eval.zeroshot.limit?"),
    ("+sede=1", "unknown key sede: did you mean seed?"),
])
def test_keys_added_with_plus_that_no_schema_has_are_refused(override, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        build(compose_run(override))
    assert "\n" not in str(err.value)


def test_open_ended_keys_stay_open():
    """Maps the schemas declare as maps take any key; typed nodes nested in an option (eval.corpus) do not."""
    run = build(compose_run("+model.distribution.xx=3"))
    assert run.model.distribution["xx"] == 3
    build(compose_run("sampler=counts", "++sampler.per_language={en: 4, sw: 4}"))
    with pytest.raises(ValueError, match="unknown key eval.corpus.nmae: did you mean eval.corpus.name?"):
        build(compose_run("eval=flores", "+eval.corpus.nmae=x"))


@pytest.mark.parametrize("override, line", [
    ("compressor.sparsty=0.5", "mbs: error: unknown key compressor.sparsty: did you mean compressor.sparsity or "
                               "compressor.layer_sparsity? the keys of compressor are layer_sparsity, m, n, "
                               "owl_lambda, owl_m, sparsity"),
    ("dry_run=maybe", "mbs: error: dry_run='maybe' is not a boolean (true or false)"),
    ("calibration_seqlen=long", "mbs: error: calibration_seqlen='long' is not an integer or null"),
    ("+sampler.segmnts=8", "mbs: error: unknown key sampler.segmnts: did you mean sampler.segments?"),
])
def test_run_py_reports_bad_keys_and_types_in_one_line(tmp_path, override, line):
    from conftest import run_py

    proc = run_py(tmp_path / "run", "model=tiny-llama", "dry_run=true", override, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(line), proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("model, overrides, message", [
    ("tiny-gpt2", ["model.seqlen=1024"], "model.seqlen=1024 is more than the 512 positions tiny-gpt2 has"),
    ("tiny-llama", ["calibration_seqlen=600"], "calibration_seqlen=600 is more than the 512 positions tiny-llama has"),
    ("tiny-gemma3-multimodal", ["model.seqlen=513"], "model.seqlen=513 is more than the 512 positions"),
])
def test_a_sequence_longer_than_the_model_positions_is_refused_before_loading(model, overrides, message, monkeypatch):
    from mbs.models import loading
    from mbs.pipeline import UserError, prepare

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    with pytest.raises(UserError, match=re.escape(message)) as err:
        prepare(compose_run(f"model={model}", *overrides))
    assert "\n" not in str(err.value)


def test_a_model_without_a_position_limit_takes_any_length():
    """BLOOM (ALiBi) declares no maximum: nothing to refuse."""
    from mbs.models.loading import check_positions, model_skeleton

    check_positions(model_skeleton(build(compose_run("model=tiny-bloom")).model).config, {"model.seqlen": 10**6}, "b")


def test_run_py_leaves_other_hydra_errors_as_hydra_reports_them(tmp_path):
    from conftest import run_py

    proc = run_py(tmp_path / "run", "model=tiny-llama", "eval.languages=[en", check=False)
    assert proc.returncode == 1 and "no viable alternative at input '[en'" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
