"""Hub sources against local files in each hub dataset's schema and exact layout (the same fsspec + pyarrow code path as
on the hub), seeded sampling, offline errors, local corpora, the
token cache, distributions from TSV and estimates, the temperature sampler, and composition of every new option."""
import glob
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir

import mbs.config
from mbs.data.cache import TokenCache, stream_key
from mbs.data.calibration import build_calibration, build_eval_windows
from mbs.data.corpora import UDHRCorpus
from mbs.data.distributions import estimate_from_tokenizer, read_tsv
from mbs.data.hub import HubCorpus, reservoir
from mbs.data.languages import SOURCE_COLUMNS, codes_in, from_source, source_code
from mbs.data.local import LocalCorpus
from mbs.data.sampling import ProportionalSampler, TemperatureSampler, UniformSampler
from mbs.models.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
# The hub root of each shipped config, replaced by a local directory holding files in the same layout.
HUB_PREFIX = {"cc100": "hf://datasets/statmt/cc100@refs%2Fconvert%2Fparquet",
              "xlsum": "hf://datasets/csebuetnlp/xlsum@refs%2Fconvert%2Fparquet",
              "flores": "hf://datasets/mteb/flores", "flores_plus": "hf://datasets/openlanguagedata/flores_plus",
              "fineweb2": "hf://datasets/HuggingFaceFW/fineweb-2", "fineweb": "hf://datasets/HuggingFaceFW/fineweb",
              "wikitext2": "hf://datasets/Salesforce/wikitext"}


def composed(*overrides):
    mbs.config.register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def words(lang, i, n=30):
    return " ".join(f"{lang}{i}w{j}" for j in range(n))


def row_of(text: str, prefix: str) -> int:
    """The row number i of a text made by words(prefix, i)."""
    return int(text[len(prefix):].split("w")[0])


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


# Fixtures in each hub dataset's schema (column names and types) and file layout.
def cc100_files(root: Path, config: str, n: int, partial: bool = False, shards: int = 1) -> None:
    """The parquet export: <config>/train/NNNN.parquet, or <config>/partial-train/ for configs over 5 GB; a row per
    line with its trailing newline, documents of three lines separated by blank rows."""
    rows = [{"id": str(i), "text": "\n" if i % 4 == 3 else words(config, i) + "\n"} for i in range(n)]
    per = -(-n // shards)
    for s in range(shards):
        write_parquet(root / config / ("partial-train" if partial else "train") / f"{s:04d}.parquet",
                      rows[s * per : (s + 1) * per])


def xlsum_files(root: Path, config: str, n: int) -> None:
    for split in ("train", "validation", "test"):
        rows = [{"id": f"{split}-{i}", "url": f"https://www.bbc.com/{config}/{i}", "title": f"t{i}", "summary": f"s{i}",
                 "text": f"{split} " + words(config, i)} for i in range(n)]
        write_parquet(root / config / split / "0000.parquet", rows)


def mteb_flores_files(root: Path, codes: list[str], n: int) -> None:
    """mteb/flores: one file per split at the repository root, one column per FLORES code."""
    for split in ("dev", "devtest"):
        rows = [{"id": i, **{code: f"{split} " + words(code, i, 12) for code in codes}} for i in range(n)]
        write_parquet(root / f"{split}.parquet", rows)


def flores_plus_files(root: Path, code: str, n: int) -> None:
    """openlanguagedata/flores_plus: {split}/{code}.parquet, the sentence in `text`."""
    iso, script = code.split("_")[:2]
    for split in ("dev", "devtest"):
        rows = [{"id": i, "iso_639_3": iso, "iso_15924": script, "glottocode": "x", "text": f"{split} " + words(code, i),
                 "url": "https://en.wikinews.org/x", "domain": "wikinews", "topic": "t", "has_image": "no",
                 "has_hyperlink": "no", "last_updated": "1.0"} for i in range(n)]
        write_parquet(root / split / f"{code}.parquet", rows)


def fineweb2_files(root: Path, code: str, n: int) -> None:
    for split in ("train", "test"):
        rows = [{"text": f"{split} " + words(code, i), "id": f"<urn:uuid:{i}>", "dump": "CC-MAIN-2024-10",
                 "language": code.split("_")[0], "language_score": 0.9} for i in range(n)]
        write_parquet(root / "data" / code / split / "000_00000.parquet", rows)


def fineweb_sample_files(root: Path, n: int, shards: int = 2) -> None:
    for s in range(shards):
        rows = [{"text": words(f"en{s}x", i), "id": f"<urn:uuid:{s}-{i}>", "dump": "CC-MAIN-2024-10"} for i in range(n)]
        write_parquet(root / "sample" / "10BT" / f"{s:03d}_00000.parquet", rows)


def wikitext_files(root: Path, n: int) -> None:
    for split in ("train", "validation", "test"):
        rows = [{"text": "" if i % 3 == 0 else f" = {split} {i} = \n" if i % 3 == 1 else f" {words(split, i)} \n"}
                for i in range(n)]
        write_parquet(root / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet", rows)


def local_hub(tmp_path, source, *overrides) -> HubCorpus:
    """The shipped data=<source> config, its hub root replaced by tmp_path (other datasets' roots, in
    language_files, by tmp_path/<name>)."""
    cfg = composed(f"data={source}", *overrides)
    cfg.data.data_files = cfg.data.data_files.replace(HUB_PREFIX[source], str(tmp_path))
    for code, pattern in cfg.data.language_files.items():
        for name, prefix in HUB_PREFIX.items():
            pattern = pattern.replace(prefix + "/", f"{tmp_path}/{name}/")
        cfg.data.language_files[code] = pattern
    return mbs.config.build(cfg).data


def test_code_table_round_trips():
    for column in SOURCE_COLUMNS:
        for code in codes_in(column):
            assert from_source(column, source_code(code, column)) == code
    assert [source_code("sw", c) for c in ("flores", "cc100", "xlsum", "flores_plus", "fineweb2")] == [
        "swh_Latn", "sw", "swahili", "swh_Latn", "swh_Latn"]
    assert source_code("zh-Hans", "cc100") == "zh-Hans" and source_code("zh-Hant", "flores") == "zho_Hant"
    assert source_code("zh-Hans", "flores_plus") == "cmn_Hans" and source_code("zh-Hans", "fineweb2") == "cmn_Hani"
    assert source_code("en", "fineweb2") is None and source_code("fa", "fineweb2") == "fas_Arab"
    assert source_code("nso", "cc100") == "ns" and source_code("ko", "flores") == "kor_Hang"
    assert codes_in("wikitext") == ["en"] and source_code("ca", "xlsum") is None


def test_cc100_export_train_and_partial_train_whole_documents_disjoint(tmp_path):
    cc100_files(tmp_path, "sw", 400)
    cc100_files(tmp_path, "en", 400, partial=True, shards=4)  # a config over 5 GB: partial-train/, several shards
    corpus = local_hub(tmp_path, "cc100", "data.max_documents=10", "data.pool_rows=200")
    for code in ("sw", "en"):
        cal, ev = corpus.texts(code, "calibration"), corpus.texts(code, "evaluation")
        assert corpus.rows_read[(code, "calibration")] == 200  # the stream stops at pool_rows (400 rows exist)
        assert corpus.rows_read[(code, "evaluation")] == 400  # rows [200, 400): the calibration rows skipped
        assert len(cal) == len(ev) == 10 and not set(cal) & set(ev)
        for doc in cal + ev:  # whole documents: three consecutive lines, joined
            lines = doc.split("\n")
            first = row_of(lines[0], code)
            assert lines == [words(code, first + k) for k in range(3)] and first % 4 == 0
    cc100_files(tmp_path, "yo", 40)  # fewer than 2 x pool_rows rows: the two halves
    small = corpus.texts("yo", "calibration"), corpus.texts("yo", "evaluation")
    assert [row_of(d, "yo") for d in small[0]] == [0, 4, 8, 12, 16] and [row_of(d, "yo") for d in small[1]] == [
        20, 24, 28, 32, 36]
    starts = sorted(row_of(d, "sw") for d in corpus.texts("sw", "calibration"))
    assert starts[-1] - starts[0] > 100  # drawn across the 200 rows (50 documents), not the first 10 documents


def test_hub_sampling_is_seeded_and_keyed(tmp_path, tokenizer):
    cc100_files(tmp_path, "sw", 400)
    draw = lambda *o: local_hub(tmp_path, "cc100", "data.max_documents=10", "data.pool_rows=200", *o)  # noqa: E731
    assert draw().texts("sw", "calibration") == draw().texts("sw", "calibration")  # deterministic
    assert draw().texts("sw", "calibration") != draw("data.sample_seed=1").texts("sw", "calibration")
    keys = {stream_key(tokenizer, draw(*o), "sw", "calibration")
            for o in [(), ("data.sample_seed=1",), ("data.pool_rows=300",), ("data.max_documents=11",)]}
    assert len(keys) == 4  # every sampling setting is part of the token-cache key
    capped = local_hub(tmp_path, "cc100", "data.max_documents=40", "data.pool_rows=200", "data.max_chars=2000")
    texts = capped.texts("sw", "calibration")
    assert sum(map(len, texts)) == 2000 and 3 <= len(texts) <= 4  # ~610-character documents
    assert [row_of(d, "sw") for d in texts] != [0, 4, 8, 12][: len(texts)]  # a random subset, not the first


def test_reservoir_is_uniform():
    counts = torch.zeros(100)
    for seed in range(2000):
        for row, _ in reservoir(((i, "") for i in range(100)), 10, random.Random(seed)):
            counts[row] += 1
    assert counts.sum() == 20000 and counts.min() > 140 and counts.max() < 260  # 200 expected, sd ~13


def test_flores_from_mteb_wide_columns_parallel(tmp_path):
    mteb_flores_files(tmp_path, ["eng_Latn", "swh_Latn", "zho_Hans", "yor_Latn"], 30)
    flores = local_hub(tmp_path, "flores")
    sw, zh = flores.texts("sw", "calibration"), flores.texts("zh-Hans", "evaluation")
    assert sw == [f"dev {words('swh_Latn', i, 12)}" for i in range(30)]  # the whole split, in order
    assert zh == [f"devtest {words('zho_Hans', i, 12)}" for i in range(30)]
    few = local_hub(tmp_path, "flores", "data.max_documents=5")  # a sample: the same sentences in every language
    rows = [[row_of(t, f"devtest {source_code(c, 'flores')}") for t in few.texts(c, "evaluation")]
            for c in ("en", "sw", "yo")]
    assert rows[0] == rows[1] == rows[2] and len(rows[0]) == 5 and rows[0] != list(range(5))
    with pytest.raises(ValueError, match=r"no column 'ibo_Latn' \(it has: id, eng_Latn, swh_Latn") as err:
        flores.texts("ig", "calibration")
    assert "\n" not in str(err.value)


def test_flores_plus_layout(tmp_path):
    flores_plus_files(tmp_path, "cmn_Hans", 20)
    flores_plus_files(tmp_path, "swh_Latn", 20)
    corpus = local_hub(tmp_path, "flores_plus")
    assert corpus.texts("zh-Hans", "calibration") == [f"dev {words('cmn_Hans', i)}" for i in range(20)]
    assert corpus.texts("sw", "evaluation")[0] == f"devtest {words('swh_Latn', 0)}"
    assert "ak" not in corpus.languages() and "zh-Hant" in corpus.languages()


def test_fineweb2_with_english_from_fineweb(tmp_path):
    fineweb2_files(tmp_path, "swh_Latn", 50)
    fineweb2_files(tmp_path, "cmn_Hani", 50)
    fineweb_sample_files(tmp_path / "fineweb", 60)
    corpus = local_hub(tmp_path, "fineweb2", "data.max_documents=8", "data.pool_rows=40")
    assert "en" in corpus.languages() and "zh-Hant" not in corpus.languages()
    sw = corpus.texts("sw", "calibration")
    assert len(sw) == 8 and all(t.startswith("train swh_Latn") for t in sw)
    assert all(t.startswith("test ") for t in corpus.texts("sw", "evaluation"))
    assert corpus.texts("zh-Hans", "calibration")[0].startswith("train cmn_Hani")
    cal, ev = corpus.texts("en", "calibration"), corpus.texts("en", "evaluation")  # one pool: rows [0,40), [40,80)
    assert len(cal) == len(ev) == 8 and not set(cal) & set(ev)
    assert corpus.rows_read[("en", "evaluation")] == 80
    assert corpus.url("en", "calibration").endswith("fineweb/sample/10BT/*.parquet")


def test_xlsum_and_wikitext_map_splits(tmp_path):
    xlsum_files(tmp_path, "swahili", 50)
    xlsum = local_hub(tmp_path, "xlsum", "data.max_documents=20")
    assert all(t.startswith("train ") for t in xlsum.texts("sw", "calibration"))
    assert len(xlsum.texts("sw", "calibration")) == 20
    assert xlsum.texts("sw", "evaluation")[0].startswith("validation ")
    assert xlsum.rows_read[("sw", "evaluation")] == 50  # fewer rows than pool_rows: all of them read

    wikitext_files(tmp_path, 30)
    wiki = local_hub(tmp_path, "wikitext2")
    test = wiki.texts("en", "evaluation")
    assert len(test) == 30 and test[0] == "" and test[1] == " = test 1 = "  # whole, in order, blank rows kept
    assert wiki.texts("en", "calibration")[1].startswith(" = train")


def test_source_errors_are_one_line(tmp_path):
    xlsum_files(tmp_path, "swahili", 5)
    corpus = local_hub(tmp_path, "xlsum")
    with pytest.raises(ValueError, match="has no text for ca; it has: .*sw") as err:
        corpus.texts("ca", "calibration")  # XL-Sum has no Catalan
    with pytest.raises(ValueError, match="no files match") as err:
        corpus.texts("fr", "calibration")
    with pytest.raises(ValueError, match="no column 'sentence'") as err:
        local_hub(tmp_path, "xlsum", "data.text_field=sentence").texts("sw", "calibration")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("source, url", [
    ("cc100", "hf://datasets/statmt/cc100@refs%2Fconvert%2Fparquet/sw/*train/*.parquet"),
    ("flores", "hf://datasets/mteb/flores/**/dev.parquet"),
    ("flores_plus", "hf://datasets/openlanguagedata/flores_plus/dev/swh_Latn.parquet"),
    ("fineweb2", "hf://datasets/HuggingFaceFW/fineweb-2/data/swh_Latn/train/*.parquet"),
    ("xlsum", "hf://datasets/csebuetnlp/xlsum@refs%2Fconvert%2Fparquet/swahili/train/*.parquet"),
])
def test_unreachable_hub_says_how_to_run_offline(monkeypatch, source, url):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    corpus = mbs.config.build(composed(f"data={source}")).data
    with pytest.raises(ValueError, match=r"data=local data\.path=.*data\.data_files") as err:
        corpus.texts("sw", "calibration")
    assert "\n" not in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    assert f"could not stream {source} from {url} (" in str(err.value)


def test_network_errors_of_any_http_stack_say_how_to_run_offline(monkeypatch):
    import fsspec

    corpus = mbs.config.build(composed("data=xlsum")).data

    def refuse(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'csebuetnlp/xlsum' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(fsspec.core, "url_to_fs", refuse)
    with pytest.raises(ValueError, match="hub is unreachable"):
        corpus.texts("sw", "calibration")

    ConnectError = type("ConnectError", (Exception,), {"__module__": "httpx"})  # not an OSError, as httpx raises it

    def no_dns(*args, **kwargs):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_dns)
    with pytest.raises(ValueError, match="ConnectError: .*Name or service not known.*hub is unreachable"):
        corpus.texts("sw", "calibration")


def test_run_py_on_a_hub_corpus_offline_fails_in_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "0", "MBS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "run.py", "model=tiny-bloom", "data=cc100", "logger=none",
                           "eval.languages=[en,sw]", f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("mbs: error: could not stream cc100 from hf://datasets/statmt/cc100@refs%2Fconvert")
    assert "data=local data.path=DIR" in lines[0] and "data.data_files" in lines[0]


def test_local_corpus_layouts(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "sw.txt").write_text("\n\n".join(words("sw", i) for i in range(10)))
    corpus = mbs.config.build(composed("data=local", f"data.path={tmp_path / 'one'}")).data
    cal, ev = corpus.texts("sw", "calibration"), corpus.texts("sw", "evaluation")
    assert (len(cal), len(ev)) == (9, 1) and ev == [words("sw", 9)] and corpus.languages() == ["sw"]
    with pytest.raises(ValueError, match=r"has no text for fr \(no fr.txt, fr.jsonl or fr.parquet in .*/one\); it has: sw"):
        corpus.texts("fr", "calibration")

    split = tmp_path / "split"
    (split / "calibration").mkdir(parents=True)
    (split / "evaluation").mkdir()
    (split / "calibration" / "en.jsonl").write_text("\n".join(f'{{"text": "{words("en", i)}"}}' for i in range(4)))
    write_parquet(split / "evaluation" / "en.parquet", [{"text": words("en", 100 + i)} for i in range(3)])
    corpus = LocalCorpus(path=str(split), max_documents=2)
    assert corpus.texts("en", "calibration") == [words("en", 0), words("en", 1)]
    assert corpus.texts("en", "evaluation") == [words("en", 100), words("en", 101)]
    (split / "calibration" / "fr.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    (split / "evaluation" / "fr.txt").write_text("a\n\nb")
    with pytest.raises(ValueError, match=r"fr\.jsonl:2: not a JSON object with a 'text' field"):
        corpus.texts("fr", "calibration")


class Counting:
    """A tokenizer that counts its calls (the cache must make the second run call it zero times)."""

    def __init__(self, tokenizer):
        self.inner, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_token_cache_hit_on_second_run(tmp_path, tokenizer):
    cc100_files(tmp_path / "hub", "sw", 200)
    cc100_files(tmp_path / "hub", "en", 200)
    corpus = local_hub(tmp_path / "hub", "cc100", "data.max_documents=60")
    cache = TokenCache(tmp_path / "tokens")
    counting = Counting(tokenizer)

    def run(seed, tok=counting, corp=corpus):
        cal = build_calibration(tok, corp, {"en": 3, "sw": 2}, 32, seed, True, cache=cache)
        win = build_eval_windows(tok, corp, ["en", "sw"], 32, True, cache=cache)
        return cal, win

    first = run(0)
    assert counting.calls == 4 and len(list((tmp_path / "tokens").glob("*/ids.safetensors"))) == 4
    corpus.rows_read.clear()
    second = run(0)
    assert counting.calls == 4 and corpus.rows_read == {}  # neither streamed nor tokenized again
    for lang in ("en", "sw"):
        assert torch.equal(first[0].segments[lang], second[0].segments[lang])
        assert all(torch.equal(a, b) for a, b in zip(first[1][lang], second[1][lang]))
    run(1)  # another seed re-uses the cached streams
    assert counting.calls == 4
    uncached = build_calibration(tokenizer, corpus, {"en": 3, "sw": 2}, 32, 0, True)
    assert all(torch.equal(uncached.segments[k], first[0].segments[k]) for k in ("en", "sw"))
    run(0, corp=local_hub(tmp_path / "hub", "cc100", "data.max_documents=50"))  # other text -> a miss
    assert counting.calls == 8


def test_temperature_sampler_reuses_allocation():
    dist = {"en": 30.0, "fr": 12.9, "sw": 0.02, "yo": 0.006}
    langs = list(dist)
    for total in (8, 40, 128):
        assert TemperatureSampler(total, 1, langs, alpha=1.0).counts(dist) == ProportionalSampler(total, 1, langs).counts(dist)
        assert TemperatureSampler(total, 1, langs, alpha=0.0).counts(dist) == UniformSampler(total, 1, langs).counts({})
    mid = TemperatureSampler(128, 1, langs, alpha=0.3).counts(dist)
    assert ProportionalSampler(128, 1, langs).counts(dist)["sw"] < mid["sw"] < UniformSampler(128, 1, langs).counts({})["sw"]
    with pytest.raises(ValueError, match="sampler.alpha=1.5"):
        TemperatureSampler(10, 1, langs, alpha=1.5).counts(dist)


def test_distribution_tsv(tmp_path):
    good = tmp_path / "good.tsv"
    good.write_text("# my model\niso\tshare\nen\t60\nsw\t0.5  # Swahili\n\nfr\t39.5\n")
    assert read_tsv(good) == {"en": 60.0, "sw": 0.5, "fr": 39.5}
    spec = mbs.config.build(composed("model=tiny-bloom", f"model.distribution_tsv={good}")).model
    assert spec.distribution == {"en": 60.0, "sw": 0.5, "fr": 39.5} and "good.tsv" in spec.distribution_source
    for text, message in [("en\t60\nsw\tlots\n", "bad.tsv:2: share 'lots' of sw is not a number"),
                          ("en\t1\n\n# c\nsw 2\n", "bad.tsv:4: expected 'code<TAB>share'"),
                          ("en\t0\nsw\t0\n", "bad.tsv:2: shares sum to zero"),
                          ("en\t1\nxx\t2\n", "bad.tsv:2: unknown language code 'xx'"),
                          ("en\t1\nen\t2\n", "bad.tsv:2: en is given twice"),
                          ("en\t-1\n", "bad.tsv:1: .* must be a finite number >= 0")]:
        (tmp_path / "bad.tsv").write_text(text)
        with pytest.raises(ValueError, match=message) as err:
            ModelSpec(source="tiny", tiny_arch="bloom", distribution_tsv=str(tmp_path / "bad.tsv"))
        assert "\n" not in str(err.value)


def test_estimated_distribution(tokenizer):
    shares = estimate_from_tokenizer(tokenizer, sharpness=4.0, languages=["en", "sw", "yo", "zh-Hans"])
    assert sum(shares.values()) == pytest.approx(100.0)
    udhr = UDHRCorpus()
    tokens = {k: len(tokenizer("\n\n".join(udhr.texts(k, "calibration") + udhr.texts(k, "evaluation")),
                               add_special_tokens=False)["input_ids"]) for k in shares}
    ranked = sorted(shares, key=shares.get, reverse=True)
    assert ranked == sorted(tokens, key=tokens.get)  # fewer tokens for the same declaration -> larger share
    best = ranked[0]
    for k in shares:  # share ∝ premium^-4 exactly
        assert shares[k] / shares[best] == pytest.approx((tokens[k] / tokens[best]) ** -4.0)


def test_prepare_with_estimate_and_hub_sources_offline(tmp_path):
    from mbs.pipeline import prepare

    cc100_files(tmp_path / "cc100", "en", 120)
    cc100_files(tmp_path / "cc100", "sw", 120)
    xlsum_files(tmp_path / "xlsum", "english", 6)
    xlsum_files(tmp_path / "xlsum", "swahili", 6)
    cfg = composed("model=tiny-bloom", "model.distribution_estimate=true", "data=cc100", "eval=xlsum",
                   "eval.languages=[en,sw]", "sampler.segments=6", "logger=none",
                   f"data.data_files='{tmp_path}/cc100/{{code}}/*train/*.parquet'",
                   f"eval.corpus.data_files='{tmp_path}/xlsum/{{code}}/{{split}}/*.parquet'")
    prepared = prepare(cfg)
    spec = prepared.run.model
    assert spec.distribution_is_proxy and spec.distribution_source.startswith("ESTIMATE")
    assert set(prepared.counts) == {"en", "sw"} and sum(prepared.counts.values()) == 6
    assert set(prepared.windows) == {"en", "sw"} and prepared.calibration.segments["en"].shape[1] == 64


NEW_OPTIONS = ["data=cc100", "data=xlsum", "data=flores", "data=flores_plus", "data=fineweb2", "data=wikitext2",
               "eval=xlsum", "eval=flores", "eval=flores_plus",
               "eval=wikitext2", "sampler=temperature", "sampler=temperature sampler.alpha=0.5",
               "model=qwen2.5-0.5b model.distribution_estimate=false +model.distribution.en=1.0"] + [
    f"model={Path(p).stem}" + (" model.path=org/x" if Path(p).stem == "hf" else "")
    for p in glob.glob(os.path.join(CONF, "model", "*.yaml"))]


@pytest.mark.parametrize("override", NEW_OPTIONS)
def test_new_options_compose_and_build(override):
    run = mbs.config.build(composed(*override.split(" "), "logger=none"))
    if override.startswith("data="):
        assert isinstance(run.data, HubCorpus) and run.data.name == override[5:]
    if override.startswith("eval="):
        assert isinstance(run.eval.corpus, HubCorpus)
    if override.startswith("sampler"):
        assert isinstance(run.sampler, TemperatureSampler)


def test_local_and_done_when_commands_compose(tmp_path):
    run = mbs.config.build(composed("data=local", f"data.path={tmp_path}", "sampler=temperature"))
    assert isinstance(run.data, LocalCorpus)
    run = mbs.config.build(composed("data=cc100", "eval=xlsum", "model=bloom-560m", "engine.device=cuda"))
    assert run.data.name == "cc100" and run.eval.corpus.name == "xlsum" and run.model.path == "bigscience/bloom-560m"
    with pytest.raises(ValueError, match="data=local needs data.path=DIR"):
        mbs.config.build(composed("data=local"))  # path is required
