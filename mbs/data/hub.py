"""Hugging Face hub corpora (CC-100, XL-Sum, FLORES-200, FineWeb-2, WikiText), streamed from the hub's parquet files.

One class serves every hub source: a source is a code-table column (our code -> its language name), a ``data_files``
pattern (``{code}``: the source's language name, ``{split}``: the hub split), a mapping from our splits to its splits,
and a text field (``{code}`` there: one column per language, as in ``mteb/flores``). Files are listed with fsspec
(``hf://`` on the hub, or a local path in the same layout: tests, offline mirrors) and read a row group at a time with
pyarrow, so drawing a few calibration segments never downloads a corpus.

Sampling: of each language and split, the first ``pool_rows`` rows are streamed (the files in a seeded random order)
and ``max_documents`` documents are drawn from them by seeded reservoir sampling (uniform over what was streamed, one
pass), then at most ``max_chars`` characters of those, chosen at random too when the cap binds; the documents kept
stay in stream order, and a pool holding at most ``max_documents`` documents is kept whole, in order (FLORES, the
WikiText test split). The draw is the same for every language (a parallel corpus gives the same sentences in each),
depends only on ``sample_seed`` and the split, and, like every field, is part of the token-cache key. With
``join_lines`` (CC-100: a row per line, blank rows between documents) the documents drawn are whole documents.

Disjoint splits: when both of our splits resolve to the same files (CC-100 and FineWeb have one split), calibration
draws from the stream's rows ``[0, pool_rows)`` and evaluation from rows ``[pool_rows, 2·pool_rows)``; a language with
fewer than ``2·pool_rows`` rows (counted from the parquet footers) is cut in two halves instead.
"""
from __future__ import annotations

import glob
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mbs.data.corpora import SPLITS, check_available, check_split
from mbs.data.languages import LANGUAGES, SOURCE_COLUMNS, codes_in, get_language, source_code
from mbs.extras import require

_NETWORK_MODULES = ("httpx", "httpcore", "requests", "urllib3", "aiohttp", "huggingface_hub", "fsspec")
BATCH_ROWS = 256  # rows converted to Python at a time (pyarrow still reads whole row groups)


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


def reservoir(rows: Iterable[tuple[int, str]], k: int, rng: random.Random) -> list[tuple[int, str]]:
    """k items drawn uniformly from a stream of unknown length in one pass (Algorithm R); all of it if shorter."""
    sample: list[tuple[int, str]] = []
    for n, row in enumerate(rows):
        if n < k:
            sample.append(row)
        else:
            j = rng.randrange(n + 1)
            if j < k:
                sample[j] = row
    return sample


def documents_of_lines(rows: Iterable[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """(first row, document) for runs of non-blank rows (lines) separated by blank rows."""
    lines: list[str] = []
    first = 0
    for n, line in rows:
        if line.strip():
            first = n if not lines else first
            lines.append(line)
        elif lines:
            yield first, "\n".join(lines)
            lines = []
    if lines:
        yield first, "\n".join(lines)


def within_chars(sample: list[tuple[int, str]], max_chars: int, rng: random.Random) -> list[str]:
    """The texts of (row, text) pairs in row order, at most ``max_chars`` characters (0: no cap) of them; when the cap
    binds, the documents kept are a random subset (the last one cut to fit), not the first rows."""
    if max_chars and sum(len(text) for _, text in sample) > max_chars:
        sample = list(sample)
        rng.shuffle(sample)
        kept, chars = [], 0
        for row, text in sample:
            if chars >= max_chars:
                break
            kept.append((row, text[: max_chars - chars]))
            chars += len(kept[-1][1])
        sample = kept
    return [text for _, text in sorted(sample)]


@dataclass
class HubCorpus:
    """A hub dataset streamed from parquet; see the module docstring for sampling, splits and caps."""

    name: str = "hub"
    column: str = ""  # the code-table column naming this source's languages (see languages.SOURCE_COLUMNS)
    # Files of one language and hub split: {code} is the source's language name, {split} the hub split.
    data_files: str = ""
    # Per-language patterns used instead of data_files, keyed by our code (e.g. FineWeb-2's English from FineWeb).
    language_files: dict[str, str] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=lambda: {"calibration": "train", "evaluation": "validation"})
    text_field: str = "text"  # the column holding the text; "{code}": the column named by the language's code
    max_documents: int = 1000  # documents kept per language and split, at most
    pool_rows: int = 4000  # ... drawn from the first pool_rows rows streamed (the cap on what is read)
    sample_seed: int = 0  # seeds the draw and the file order; changing it changes the token-cache key
    max_chars: int = 1_000_000  # characters kept per language and split, at most
    skip_empty: bool = True  # drop blank rows
    join_lines: bool = False  # rows are lines and blank rows end documents (CC-100): draw whole documents

    def __post_init__(self) -> None:
        require("datasets", "hub", f"data={self.name}")
        if self.column not in SOURCE_COLUMNS or self.column == "udhr":
            raise ValueError(f"data.column={self.column!r} must be one of {', '.join(SOURCE_COLUMNS[1:])}")
        if "{code}" not in self.data_files + self.text_field:
            raise ValueError(f"data.data_files={self.data_files!r} needs a {{code}} placeholder for the language "
                             f"(or data.text_field='{{code}}' when each language is a column)")
        for code in self.language_files:
            get_language(code)
        if sorted(self.splits) != sorted(SPLITS):
            raise ValueError(f"data.splits must map exactly {', '.join(SPLITS)} to hub splits, got {dict(self.splits)}")
        if self.max_documents < 1 or self.max_chars < 1:
            raise ValueError("data.max_documents and data.max_chars must be >= 1 (they cap what is streamed)")
        if self.pool_rows < 1:
            raise ValueError(f"data.pool_rows={self.pool_rows} must be >= 1 (rows streamed per language and split)")
        self.splits = dict(self.splits)
        self.language_files = dict(self.language_files)
        self.rows_read: dict[tuple[str, str], int] = {}  # (language, split) -> rows pulled from the stream

    def languages(self) -> list[str]:
        have = set(codes_in(self.column)) | set(self.language_files)
        return [code for code in LANGUAGES if code in have]

    def _code(self, language: str) -> str:
        return source_code(language, self.column) or language

    def url(self, language: str, split: str) -> str:
        pattern = self.language_files.get(language, self.data_files)
        return pattern.format(code=self._code(language), split=self.splits[split])

    def field_name(self, language: str) -> str:
        return self.text_field.format(code=self._code(language))

    def source_files(self, language: str, split: str) -> list[Path]:
        """Local files a language and split are read from (their size and mtime key the token cache); none on the hub."""
        url = self.url(language, split)
        return [] if "://" in url else [Path(p) for p in sorted(glob.glob(url, recursive=True))]

    def texts(self, language: str, split: str) -> list[str]:
        check_split(split)
        check_available(self, [language], self.name)
        other = SPLITS[1 - SPLITS.index(split)]
        url = self.url(language, split)
        self.rows_read[(language, split)] = 0
        try:
            start, stop = 0, self.pool_rows
            if url == self.url(language, other):  # one stream for both splits: halves, at most pool_rows each
                start = min(self.pool_rows, self._count_rows(url, 2 * self.pool_rows) // 2)
                start, stop = (start, start + self.pool_rows) if split == "evaluation" else (0, start)
            stream = self._rows(url, language, split, start, stop)
            documents = documents_of_lines(stream) if self.join_lines else stream
            documents = ((n, text) for n, text in documents if text.strip() or not self.skip_empty)
            rng = random.Random(f"mbs-hub/{self.sample_seed}/{split}")
            texts = within_chars(reservoir(documents, self.max_documents, rng), self.max_chars, rng)
        except Exception as err:
            raise self._explain(err, url, language, split) from err
        if not texts:
            raise ValueError(f"{self.name}: no {split} text for {language!r} in {url} (rows {start}..{stop})")
        return texts

    def _explain(self, err: Exception, url: str, language: str, split: str) -> Exception:
        """A one-line ValueError for what a user can fix (hub unreachable, no files); else ``err``."""
        if _is_network_error(err):
            return ValueError(unreachable_message(self.name, url, err))
        if isinstance(err, FileNotFoundError):
            return ValueError(f"{self.name}: no files match data.data_files={url!r} for {language!r} ({split}); "
                              f"if the hub's layout changed, set data.data_files to the new pattern")
        return err

    def _files(self, url: str):
        """The filesystem and the files matching ``url`` in a seeded random order, the same for both splits (files
        shared by the splits then stay disjoint by row range)."""
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        files = sorted(fs.glob(path))
        if not files:
            raise FileNotFoundError(url)
        random.Random(f"mbs-hub-files/{self.sample_seed}").shuffle(files)
        return fs, files

    def _count_rows(self, url: str, enough: int) -> int:
        """Rows in the files of ``url`` (from parquet footers, in stream order), counted until ``enough``."""
        import pyarrow.parquet as pq

        fs, files = self._files(url)
        total = 0
        for path in files:
            if total >= enough:
                break
            with fs.open(path, "rb") as handle:
                total += pq.ParquetFile(handle).metadata.num_rows
        return total

    def _rows(self, url: str, language: str, split: str, start: int, stop: int) -> Iterator[tuple[int, str]]:
        """(row number, text) of the stream's rows [start, stop); with join_lines, a blank row at each file's end."""
        import pyarrow.parquet as pq

        column = self.field_name(language)
        fs, files = self._files(url)
        n = 0
        for path in files:
            with fs.open(path, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                names = parquet.schema_arrow.names
                if column not in names:
                    listed = ", ".join(names[:12]) + (f", ... ({len(names)} columns)" if len(names) > 12 else "")
                    raise ValueError(f"{self.name}: {path} has no column {column!r} (it has: {listed}); "
                                     f"set data.text_field")
                for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=[column]):
                    for text in batch.column(0).to_pylist():
                        if n == stop:
                            return
                        self.rows_read[(language, split)] += 1
                        if n >= start:
                            yield n, (text or "").rstrip("\n")
                        n += 1
            if self.join_lines and n > start:
                yield n - 1, ""  # a file ends a document (files come in a shuffled order)
