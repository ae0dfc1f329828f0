"""Inputs a user can give that MBS cannot use, each refused in one line naming the file, argument or reason, before
the model loads where possible (issue 22): local model directories, local data, offline hub zero-shot tasks, disks,
report directories and the Python API."""
import errno
import os
import re
from pathlib import Path

import pytest
import torch
import mbs.config
import mbs.pipeline
from conftest import compose_run
from mbs.models.loading import load_model
from mbs.models.spec import ModelSpec

TINY = ["model=tiny-llama", "logger=none", "sampler.segments=8", "eval.languages=[en,sw]", "eval.max_windows=2",
        "progress=false", "analysis.layers=[]"]


composed = compose_run  # the run config as run.py composes it (tests/conftest.py)


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# -- local model directories ---------------------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path, tokenizer):
    """A tiny Llama saved as a local transformers checkpoint (config.json, model.safetensors, tokenizer)."""
    from mbs.models.tiny import tiny_model

    directory = tmp_path / "model"
    tiny_model("llama", {}).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _edit_tensors(directory: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def _q_proj(tensors):
    return next(k for k in tensors if "q_proj" in k)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _corrupt(directory: Path, how: str) -> None:
    weights = directory / "model.safetensors"
    if how == "zero bytes":
        weights.write_bytes(b"")
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "no weights":
        weights.unlink()
    elif how == "encoder-only":
        from transformers import BertConfig, BertModel

        weights.unlink()
        BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             vocab_size=64)).save_pretrained(directory)
    elif how == "index names a missing shard":
        (directory / "model.safetensors.index.json").write_text(
            '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model.safetensors"}}')
    elif how == "wrong shape":
        _edit_tensors(directory, lambda t: t.__setitem__(_q_proj(t), torch.zeros(3, 3)))
    elif how == "missing weight":
        _edit_tensors(directory, lambda t: t.pop(_q_proj(t)))
    elif how == "malicious pickle":
        weights.unlink()
        torch.save({"x": _Payload()}, directory / "pytorch_model.bin")


PRE_LOAD = {
    "zero bytes": r"weight file .*model\.safetensors is empty \(0 bytes\)",
    "truncated": r"weight file .*model\.safetensors \([\d,]+ bytes\) is not a readable safetensors file, it is truncated",
    "no weights": r"model\.path=.* holds no weights",
    "encoder-only": r"model\.path=.*: config\.json describes BertModel model, not a causal language model",
    "index names a missing shard": r".*model\.safetensors\.index\.json names weight files that are not there: "
                                   r"model-00001-of-00002\.safetensors",
}
AT_LOAD = {
    "wrong shape": r".*model\.safetensors: 1 weight\(s\) have the wrong shape \(model\.layers\.0\.self_attn\.q_proj"
                   r"\.weight \(3, 3\) in the checkpoint vs \(64, 64\)",
    "missing weight": r".*model\.safetensors: the checkpoint lacks 1 weight\(s\) the model needs "
                      r"\(model\.layers\.0\.self_attn\.q_proj\.weight\); transformers would initialise them at random",
    "malicious pickle": r".*pytorch_model\.bin: refused to unpickle the weights",
}


@pytest.mark.parametrize("how", sorted(PRE_LOAD))
def test_a_broken_model_directory_is_refused_before_loading(checkpoint, how):
    _corrupt(checkpoint, how)
    with pytest.raises(ValueError, match=PRE_LOAD[how]) as err:
        ModelSpec(name="mine", source="hub", path=str(checkpoint), seqlen=32)
    one_line(err)


@pytest.mark.parametrize("how", sorted(AT_LOAD))
def test_a_checkpoint_transformers_would_fill_in_at_random_is_refused(checkpoint, how, monkeypatch):
    monkeypatch.chdir(checkpoint)
    _corrupt(checkpoint, how)
    spec = ModelSpec(name="mine", source="hub", path=str(checkpoint), seqlen=32)
    with pytest.raises(ValueError, match=AT_LOAD[how]) as err:
        load_model(spec)
    one_line(err)
    assert not (checkpoint / "pwned").exists()


def test_tied_weights_are_not_missing(tmp_path):
    from mbs.models.tiny import tiny_model

    model = tiny_model("gemma3", {})
    assert model.config.tie_word_embeddings
    model.save_pretrained(tmp_path)
    loaded = load_model(ModelSpec(name="mine", source="hub", path=str(tmp_path), seqlen=32, dtype="float32"))
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_a_run_on_a_checkpoint_with_a_missing_weight_fails_in_one_line_and_writes_nothing(checkpoint, tmp_path):
    _corrupt(checkpoint, "missing weight")
    cfg = composed(*TINY, "model.source=hub", f"model.path={checkpoint}", "model.dtype=float32")
    with pytest.raises(mbs.pipeline.UserError, match=AT_LOAD["missing weight"]) as err:
        mbs.pipeline.run(cfg, tmp_path / "run")
    one_line(err)
    assert not (tmp_path / "run" / "results.json").exists()


# -- local data ------------------------------------------------------------------------------------------------------

def _docs(code: str, n: int = 12) -> str:
    return "\n\n".join(f"{code} document number {i} with a few words of text." for i in range(n))


def test_local_data_accepts_any_bcp47_code(tmp_path):
    from mbs.data.languages import get_language
    from mbs.data.local import LocalCorpus

    for code in ("en", "yue", "sr-Latn"):
        (tmp_path / f"{code}.txt").write_text(_docs(code), encoding="utf-8")
    corpus = LocalCorpus(path=str(tmp_path))
    assert corpus.languages() == ["en", "sr-Latn", "yue"]
    assert corpus.texts("yue", "evaluation") == [f"yue document number {i} with a few words of text." for i in (10, 11)]
    yue = get_language("yue")
    assert (yue.name, yue.iso639_3, yue.script, yue.flores) == ("Cantonese", "yue", "Hant", None)
    assert get_language("sw") is mbs.data.languages.LANGUAGES["sw"]  # the table keeps its sources
    prepared = mbs.pipeline.prepare(composed(*TINY, "data=local", f"data.path={tmp_path}", "sampler=uniform",
                                             "eval.languages=[en,yue]", "sampler.languages=[en,yue]"))
    assert prepared.counts == {"en": 4, "yue": 4} and sorted(prepared.windows) == ["en", "yue"]


@pytest.mark.parametrize("code, message", [
    ("xx", "unknown language code 'xx': not a BCP-47 language tag"),
    ("EN", "language code 'EN': write it as 'en'"),
    ("und", "unknown language code 'und': not a BCP-47 language tag"),
])
def test_a_code_that_is_no_language_is_refused(code, message):
    with pytest.raises(mbs.pipeline.UserError, match=message) as err:
        mbs.pipeline.prepare(composed(*TINY, f"eval.languages=[en,{code}]"))
    one_line(err)


def _unusable(root: Path, how: str) -> None:
    (root / "sw.txt").write_text(_docs("sw"), encoding="utf-8")
    if how == "NUL bytes":
        (root / "en.txt").write_bytes(b"\x00" * 4096)
    elif how == "not UTF-8":
        (root / "en.txt").write_bytes("caf\u00e9\n\nna\u00efve".encode("latin-1"))
    elif how == "symlink loop":
        os.symlink(root / "en.txt", root / "en.txt")
    elif how == "directory":
        (root / "en.txt").mkdir()
    elif how == "invalid code":
        (root / "en.txt").write_text(_docs("en"), encoding="utf-8")
        (root / "english.txt").write_text(_docs("en"), encoding="utf-8")
    elif how == "missing split":
        for split in ("calibration", "evaluation"):
            (root / split).mkdir()
            (root / split / "sw.txt").write_text(_docs("sw"), encoding="utf-8")
        (root / "calibration" / "en.txt").write_text(_docs("en"), encoding="utf-8")
    elif how == "no text":
        (root / "en.txt").write_text("\n\n   \n\n", encoding="utf-8")


UNUSABLE = {
    "NUL bytes": r".*en\.txt holds NUL bytes \(binary data, not text\)",
    "not UTF-8": r".*en\.txt is not UTF-8 text \(byte 3",
    "symlink loop": r".*en\.txt is a symbolic link that leads nowhere \(a loop or a missing target\)",
    "directory": r".*en\.txt is a directory, not a file of text",
    "invalid code": r".*english\.txt is not named for a language: unknown language code 'english'",
    "missing split": r"calibration languages: corpus 'local' has no text for en \(.*evaluation has no en\.\* file "
                     r"while .*calibration/en\.txt exists",
    "no text": r".*en\.txt holds no text",
}


@pytest.mark.parametrize("how", sorted(UNUSABLE))
def test_a_local_file_it_cannot_use_is_named_in_one_line_before_loading(tmp_path, how, monkeypatch):
    _unusable(tmp_path, how)
    monkeypatch.setattr(mbs.pipeline, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(mbs.pipeline.UserError, match=UNUSABLE[how]) as err:
        mbs.pipeline.prepare(composed(*TINY, "data=local", f"data.path={tmp_path}"))
    one_line(err)


# -- hub zero-shot tasks offline --------------------------------------------------------------------------------------

def test_a_hub_zero_shot_task_offline_fails_in_one_line_before_the_model_loads(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-datasets-cache")
    with pytest.raises(mbs.pipeline.UserError, match=r"eval.tasks: 'xnli_en' reads the hub dataset 'facebook/xnli' "
                                                     r"\(en\): HF_HUB_OFFLINE=1 is set and it is not in the local "
                                                     r"datasets cache") as err:
        mbs.pipeline.prepare(composed(*TINY, "eval.tasks=[udhr_mc_en,xnli_en]"))
    one_line(err)


def test_tasks_on_local_data_need_no_hub():
    from mbs.evaluate.task_data import needs_hub, task_datasets

    class Entry:
        def __init__(self, cfg):
            self.cfg = cfg

    class Manager:
        _index = {"group": Entry({"group": "group", "task": ["a", {"task": "inline", "dataset_path": "json"}]}),
                  "a": Entry({"task": "a", "dataset_path": "org/data", "dataset_name": "en"})}

    assert task_datasets(Manager(), ["group"]) == {"a": ("org/data", "en"), "inline": ("json", None)}
    assert needs_hub("org/data") and not needs_hub("json") and not needs_hub(str(Path(__file__).parent))


# -- disks ------------------------------------------------------------------------------------------------------------

def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_an_output_path_through_a_file_fails_in_one_line_before_hydra(tmp_path):
    from conftest import ROOT

    import subprocess
    import sys

    (tmp_path / "file").write_text("")
    for args in ([f"hydra.run.dir={tmp_path}/file/run"], ["--multirun", f"hydra.sweep.dir={tmp_path}/file/${{now:%H}}"]):
        proc = subprocess.run([sys.executable, "run.py", *args, "model=tiny-llama", "logger=none"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].startswith(f"mbs: error: the output directory {tmp_path}/file") and "is a file" in lines[0]
        assert ("hydra.sweep.dir" in lines[0]) == ("--multirun" in args)


def test_a_read_only_output_path_fails_in_one_line(tmp_path, monkeypatch):
    import tempfile

    def read_only(**kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    from mbs.paths import check_creatable

    with pytest.raises(ValueError, match=r"the output directory .*/a/b is not writable \(.*: Read-only "
                                                     r"file system\); set hydra.run.dir") as err:
        check_creatable(tmp_path / "a" / "b")
    one_line(err)
    assert not (tmp_path / "a").exists()


def test_a_full_disk_while_the_logger_copies_figures_still_writes_the_results(tmp_path, monkeypatch, caplog):
    from mbs.record.loggers import NoLogger

    monkeypatch.setattr(NoLogger, "log_results", lambda self, results: _enospc())
    monkeypatch.setattr(NoLogger, "finish", lambda self, failed=False: _enospc())
    result = mbs.pipeline.run(composed(*TINY), tmp_path)
    assert (tmp_path / "results.json").is_file() and result["languages"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("logger could not record the results (OSError: No space left on device)" in w for w in warnings)


def test_a_full_cache_disk_runs_uncached(tmp_path, monkeypatch, caplog):
    """safetensors reports a full disk as a SafetensorError, not an OSError: the run still goes on uncached."""
    import safetensors.torch
    from safetensors import SafetensorError

    cache = tmp_path / "cache"
    monkeypatch.setenv("MBS_CACHE", str(cache))
    real, refused = safetensors.torch.save_file, []

    def full(tensors, filename, *args, **kwargs):
        if str(filename).startswith(str(cache)):
            refused.append(filename)
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    prepared = mbs.pipeline.prepare(composed(*TINY))
    assert prepared.calibration.total == 8 and sorted(prepared.windows) == ["en", "sw"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("running uncached" in w and "SafetensorError" in w for w in warnings), warnings
    assert refused and not list(cache.rglob("*.safetensors"))


# -- reports ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    mbs.pipeline.run(composed(*TINY), run_dir)
    return run_dir


def test_a_truncated_results_file_is_named_and_the_intact_jobs_reported(finished_run, tmp_path, capsys):
    from mbs.cli import main

    sweep = tmp_path / "sweep"
    text = (finished_run / "results.json").read_text()
    for number, (sparsity, content) in enumerate([("0.3", text), ("0.5", text[: len(text) // 2])]):
        job = sweep / f"{number}_compressor.sparsity={sparsity}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- compressor.sparsity={sparsity}\n")
        (job / "results.json").write_text(content)
    assert main("report", [str(sweep)]) == 0
    out = capsys.readouterr().out
    broken = [line for line in out.splitlines() if "unreadable" in line and "results.json" in line]
    assert "1 done, 1 unreadable" in out and len(broken) == 1
    assert f"{sweep}/1_compressor.sparsity=0.5/results.json is not a readable results file" in broken[0]
    report = (sweep / "report" / "report.md").read_text()
    tables, runs = report.split("```")[-1].split("## Runs")
    assert "compressor.sparsity=0.3" in tables and "compressor.sparsity=0.5 " not in tables
    assert "| `1_compressor.sparsity=0.5` | unreadable |" in runs  # named among the runs, with no numbers


def test_a_single_run_directory_is_reported(finished_run, capsys):
    from mbs.cli import main

    assert main("report", [str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert f"mbs: run {finished_run}: 1 job: 1 done" in out
    assert re.search(r"\| sw \| [\d.]+ \| [\d.]+ \| [\d.]+ \(×[\d.]+\) \|", (finished_run / "report" / "report.md").read_text())


# -- the Python API ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api_inputs(tmp_path_factory):
    import mbs
    from mbs.models.tiny import tiny_model, tiny_tokenizer
    from mbs.cache import Cache

    tokenizer = tiny_tokenizer(Cache(tmp_path_factory.mktemp("tok")))
    model = tiny_model("llama", {}).eval().requires_grad_(False)
    calibration = mbs.calibration_mixture(tokenizer, mbs.UDHRCorpus(), {"en": 0.5, "sw": 0.5}, seqlen=32)
    windows = mbs.evaluation_windows(tokenizer, mbs.UDHRCorpus(), ["en"], seqlen=32)
    return tokenizer, model, calibration, windows


def _api_cases(tokenizer, model, calibration, windows, tmp_path):
    import mbs
    from mbs.models.tiny import tiny_model

    with torch.device("meta"):
        meta = tiny_model("llama", {})
    (tmp_path / "file").write_text("")
    udhr = mbs.UDHRCorpus()
    return {
        "compressor str": (lambda: mbs.compress_model(model, "wanda", calibration), TypeError,
                           r"compressor must be an mbs compressor, e.g. mbs.Wanda\(sparsity=0.5\).*not 'wanda' \(str\)"),
        "compressor None": (lambda: mbs.compress_model(model, None, calibration), TypeError,
                            r"compressor must be an mbs compressor.*not NoneType"),
        "calibration None": (lambda: mbs.compress_model(model, mbs.Wanda(), None), TypeError,
                             r"calibration must be a CalibrationSet \(from mbs.calibration_mixture\), not NoneType"),
        "model str": (lambda: mbs.perplexity("gemma", windows), TypeError,
                      r"model must be a torch.nn.Module .*not 'gemma' \(str\)"),
        "model None": (lambda: mbs.compress_model(None, mbs.Wanda(), calibration), TypeError,
                       r"model must be a torch.nn.Module"),
        "load None": (lambda: mbs.load(None), TypeError, r"spec must be a conf/model option name"),
        "meta model": (lambda: mbs.compress_model(meta, mbs.Wanda(), calibration), ValueError,
                       r"model has weights on the meta device \(no data, e.g. model.embed_tokens.weight\)"),
        "string sparsity": (lambda: mbs.Wanda(sparsity="0.5"), TypeError,
                            r"Wanda\(sparsity='0.5'\): sparsity must be a float, not str"),
        "string bits": (lambda: mbs.GPTQ(bits="4"), TypeError, r"GPTQ\(bits='4'\): bits must be an int, not str"),
        "out-of-vocabulary ids": (lambda: mbs.perplexity(model, {"en": [torch.tensor([[1, 2, 99999]])]}), ValueError,
                                  r"windows\['en'\]\[0\] holds token ids outside the model's vocabulary \[0, 512\): "
                                  r"min 1, max 99999"),
        "float ids": (lambda: mbs.perplexity(model, {"en": [torch.tensor([[1.0, 2.0]])]}), TypeError,
                      r"windows\['en'\]\[0\] holds torch.float32 values: token ids must be integers"),
        "windows list": (lambda: mbs.perplexity(model, [torch.tensor([[1, 2]])]), TypeError,
                         r"windows must be a mapping of language code"),
        "corpus str": (lambda: mbs.calibration_mixture(tokenizer, "udhr", {"en": 1.0}, seqlen=32), TypeError,
                       r"corpus must be a corpus, e.g. mbs.UDHRCorpus\(\).*not 'udhr' \(str\)"),
        "distribution list": (lambda: mbs.calibration_mixture(tokenizer, udhr, ["en"], seqlen=32), TypeError,
                              r"distribution must be a mapping of language code to training share"),
        "tokenizer None": (lambda: mbs.evaluation_windows(None, udhr, ["en"], seqlen=32), TypeError,
                           r"tokenizer must be a tokenizer"),
        "languages str": (lambda: mbs.evaluation_windows(tokenizer, udhr, "en", seqlen=32), TypeError,
                          r"languages must be a list of language codes, e.g. \['en', 'sw'\], not 'en' \(str\)"),
        "config str": (lambda: mbs.compress_model(model, mbs.Wanda(), calibration, config="cpu"), TypeError,
                       r"config must be an mbs.EngineConfig or None, not 'cpu' \(str\)"),
        "export through a file": (lambda: mbs.export(model, tmp_path / "file" / "model", mbs.Wanda(), tokenizer),
                                  ValueError, r"the output directory .*file/model cannot be made: .*file is a file"),
    }


def test_the_python_api_names_the_wrong_argument(api_inputs, tmp_path):
    model = api_inputs[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name, (call, kind, message) in _api_cases(*api_inputs, tmp_path).items():
        with pytest.raises(kind, match=message) as err:
            call()
        assert "\n" not in str(err.value), name
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was compressed
    assert not (tmp_path / "file").read_text()
