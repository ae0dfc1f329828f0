"""Run identity: the experiment id and the token cache take a corpus's files from the corpus itself
(``source_files``), so a file under any config key changes both."""
import shutil

from mbs.api import compose
from mbs.data.cache import stream_key
from mbs.data.corpora import UDHRCorpus
from mbs.fingerprint import corpus_files, experiment_id

TINY = ("model=tiny-llama", "logger=none", "eval.languages=[en,sw,yo]")


def test_a_corpus_file_under_a_key_not_named_path_changes_the_id_and_the_token_cache(tmp_path, tokenizer):
    """The UDHR keeps its files under ``data.directory``; editing one (same size) re-runs the experiment and
    re-tokenizes that language only."""
    shutil.copytree(UDHRCorpus().root, tmp_path / "udhr")
    cfg = compose(*TINY, f"data.directory={tmp_path / 'udhr'}")
    corpus = UDHRCorpus(directory=str(tmp_path / "udhr"))
    before = experiment_id(cfg)
    keys = {lang: stream_key(tokenizer, corpus, lang, "calibration") for lang in ("sw", "en")}
    [sw] = corpus.source_files("sw", "calibration")
    text = sw.read_text(encoding="utf-8")
    sw.write_text(text.replace("Watu wote", "Watu wotx", 1), encoding="utf-8")
    assert experiment_id(cfg) != before
    assert stream_key(tokenizer, corpus, "sw", "calibration") != keys["sw"]
    assert stream_key(tokenizer, corpus, "en", "calibration") == keys["en"]
    sw.write_text(text, encoding="utf-8")
    assert experiment_id(cfg) == before


def test_every_language_file_of_the_corpus_counts():
    files = corpus_files(compose(*TINY).data)
    corpus = UDHRCorpus()
    assert len(files) == len(corpus.languages()) and str(corpus.source_files("yo", "evaluation")[0]) in files


def test_a_corpus_config_that_does_not_build_is_keyed_by_its_error():
    assert corpus_files(compose(*TINY, "data.eval_from_article=1").data) == {
        "error": "ValueError: data.eval_from_article=1 must be in 2..30 (the UDHR has 30 articles)"}
