"""Hugging Face hub corpora (CC-100, XL-Sum, FLORES-200, WikiText), streamed from the hub's parquet files.

One class serves every hub source: a source is a code-table column (our code -> its language name), a ``data_files``
pattern, a mapping from our splits to its splits, and a text field. Rows are *streamed* and reading stops at
``max_documents`` rows or ``max_chars`` characters per language and split, so drawing a few calibration segments never
downloads a corpus. ``data_files`` may be a local path in the same layout (tests, offline mirrors): the code path is
the same ``load_dataset("parquet", ..., streaming=True)`` call.

Disjoint splits: when both of our splits map to the same hub split (CC-100 only has ``train``), calibration reads its
rows ``[0, max_documents)`` and evaluation the rows ``[max_documents, 2 * max_documents)``.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from mbs.data.corpora import SPLITS, capped, check_available, check_split
from mbs.data.languages import SOURCE_COLUMNS, codes_in, source_code
from mbs.extras import require

_NETWORK_MODULES = ("httpx", "httpcore", "requests", "urllib3", "aiohttp", "huggingface_hub", "fsspec")


def _is_network_error(err: BaseException | None) -> bool:
    """Connection failures, whichever HTTP stack raised them (httpx, requests, aiohttp via fsspec, huggingface_hub)."""
    while err is not None:
        if isinstance(err, (ConnectionError, TimeoutError)) or any(
                cls.__module__.startswith(_NETWORK_MODULES) for cls in type(err).__mro__):
            return True
        err = err.__cause__ or err.__context__
    return False


def unreachable_message(source: str, url: str, err: BaseException) -> str:
    """One line: what failed, and the two ways to run without the hub."""
    detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
    return (f"could not stream {source} from {url} ({type(err).__name__}: {detail}): the Hugging Face hub is "
            f"unreachable or HF_HUB_OFFLINE=1 is set; run on local files with `data=local data.path=DIR` (DIR holding "
            f"<lang>.txt|.jsonl|.parquet, optionally in calibration/ and evaluation/), or download the parquet files "
            f"(`huggingface-cli download --repo-type dataset ...`) and point data.data_files at the local copy; "
            f"token streams already in $MBS_CACHE need no hub")


@dataclass
class HubCorpus:
    """A hub dataset streamed from parquet; see the module docstring for splits and caps."""

    name: str = "hub"
    column: str = ""  # the code-table column naming this source's languages (flores, cc100, xlsum, wikitext)
    # Files of one language and hub split: {code} is the source's language name, {split} the hub split.
    data_files: str = ""
    splits: dict[str, str] = field(default_factory=lambda: {"calibration": "train", "evaluation": "validation"})
    text_field: str = "text"
    max_documents: int = 1000  # rows read per language and split, at most
    max_chars: int = 1_000_000  # characters kept per language and split, at most
    skip_empty: bool = True  # drop blank rows (CC-100 separates documents with them)

    def __post_init__(self) -> None:
        require("datasets", "hub", f"data={self.name}")
        if self.column not in SOURCE_COLUMNS or self.column == "udhr":
            raise ValueError(f"data.column={self.column!r} must be one of {', '.join(SOURCE_COLUMNS[1:])}")
        if "{code}" not in self.data_files:
            raise ValueError(f"data.data_files={self.data_files!r} needs a {{code}} placeholder for the language")
        if sorted(self.splits) != sorted(SPLITS):
            raise ValueError(f"data.splits must map exactly {', '.join(SPLITS)} to hub splits, got {dict(self.splits)}")
        if self.max_documents < 1 or self.max_chars < 1:
            raise ValueError("data.max_documents and data.max_chars must be >= 1 (they cap what is streamed)")
        self.splits = dict(self.splits)
        self.rows_read: dict[tuple[str, str], int] = {}  # (language, split) -> rows pulled from the stream

    def languages(self) -> list[str]:
        return codes_in(self.column)

    def url(self, language: str, split: str) -> str:
        return self.data_files.format(code=source_code(language, self.column), split=self.splits[split])

    def texts(self, language: str, split: str) -> list[str]:
        check_split(split)
        check_available(self, [language], self.name)
        shared = self.splits["calibration"] == self.splits["evaluation"]
        start = self.max_documents if shared and split == "evaluation" else 0
        url = self.url(language, split)
        self.rows_read[(language, split)] = 0
        rows = itertools.islice(self._rows(url, language, split), start, start + self.max_documents)
        stream = ((row[self.text_field] or "").rstrip("\n") for row in rows)
        try:
            texts = capped((t for t in stream if t.strip() or not self.skip_empty), self.max_chars)
        except Exception as err:
            raise self._explain(err, url, language, split) from err
        if not texts:
            raise ValueError(f"{self.name}: no {split} text for {language!r} in {url} (rows {start}..)")
        return texts

    def _explain(self, err: Exception, url: str, language: str, split: str) -> Exception:
        """A one-line ValueError for what a user can fix (hub unreachable, no files, wrong field); else ``err``."""
        text = str(err)
        if type(err).__name__ == "ArrowInvalid" and "FieldRef" in text:
            return ValueError(f"{self.name}: {url} has no column {self.text_field!r} ({text.splitlines()[0]}); "
                              f"set data.text_field")
        if _is_network_error(err):
            return ValueError(unreachable_message(self.name, url, err))
        if isinstance(err, FileNotFoundError) or (isinstance(err, ValueError) and "valid data file" in text):
            return ValueError(f"{self.name}: no files match data.data_files={url!r} for {language!r} ({split}); "
                              f"if the hub's layout changed, set data.data_files to the new pattern")
        return err

    def _rows(self, url: str, language: str, split: str) -> Iterator[dict]:
        from datasets import load_dataset

        hub_split = self.splits[split]
        dataset = load_dataset("parquet", data_files={hub_split: url}, split=hub_split, streaming=True,
                               columns=[self.text_field])
        for row in dataset:
            self.rows_read[(language, split)] += 1
            yield row
