"""Local files as a corpus: a user's own text, or an offline copy of a hub corpus.

Layout (``<code>`` is a BCP-47 language code in its canonical form: our table's, e.g. ``sw``, ``zh-Hans``, or any
other, e.g. ``yue``, ``sr-Latn``; every data file there must be named for one)::

    DIR/<code>.txt | .jsonl | .parquet                     one file for both splits, or
    DIR/calibration/<code>.*  and  DIR/evaluation/<code>.*  one file per split

``.txt``: documents separated by blank lines. ``.jsonl``: one JSON object per line with a ``text`` field.
``.parquet``: a ``text`` column. With one file per language, the last ``eval_fraction`` of its documents (at least one)
is the evaluation split and the rest calibration, so the two never overlap.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from mbs.data.corpora import SPLITS, capped, check_available, check_split
from mbs.data.languages import LANGUAGES, get_language
from mbs.extras import require

EXTENSIONS = (".txt", ".jsonl", ".parquet")


@dataclass
class LocalCorpus:
    path: str = ""
    text_field: str = "text"  # the field (jsonl) or column (parquet) holding the text
    eval_fraction: float = 0.1  # share of documents held out for evaluation when a language has one file
    max_documents: int = 0  # per language and split; 0 = no cap
    max_chars: int = 0  # per language and split; 0 = no cap
    name: str = "local"

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("data=local needs data.path=DIR (a directory of <lang>.txt|.jsonl|.parquet files)")
        if not Path(self.path).expanduser().is_dir():
            raise ValueError(f"data.path={self.path!r} is not a directory")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction={self.eval_fraction} must be in (0, 1)")
        if self.max_documents < 0 or self.max_chars < 0:
            raise ValueError("data.max_documents and data.max_chars must be >= 0 (0 = no cap)")

    @property
    def root(self) -> Path:
        return Path(self.path).expanduser()

    @property
    def per_split(self) -> bool:
        return all((self.root / split).is_dir() for split in SPLITS)

    def _dirs(self) -> list[Path]:
        return [self.root / split for split in SPLITS] if self.per_split else [self.root]

    def _files(self, directory: Path) -> dict[str, Path]:
        """Language code -> file in one directory. Every ``*.txt|.jsonl|.parquet`` entry there must be a usable file
        named for a language (any BCP-47 code): anything else is refused in one line naming it, not skipped."""
        found: dict[str, list[Path]] = {}
        for path in sorted(directory.iterdir()):
            if path.suffix not in EXTENSIONS or path.name.startswith("."):
                continue
            if path.is_symlink() and not path.exists():
                raise ValueError(f"{path} is a symbolic link that leads nowhere (a loop or a missing target)")
            if path.is_dir():
                raise ValueError(f"{path} is a directory, not a file of text: data.path holds one file per language")
            if not path.is_file():
                raise ValueError(f"{path} is not a regular file")
            try:
                code = get_language(path.stem).code
            except ValueError as err:
                raise ValueError(f"{path} is not named for a language: {err}; name it <code>{path.suffix}") from None
            found.setdefault(code, []).append(path)
        for code, paths in found.items():
            if len(paths) > 1:
                raise ValueError(f"{directory} has {', '.join(p.name for p in paths)}: keep one file per language")
        return {code: paths[0] for code, paths in found.items()}

    def languages(self) -> list[str]:
        """Codes with a file in every split's directory: the table's in table order, then any other, sorted."""
        files = [set(self._files(d)) for d in self._dirs()]
        have = set.intersection(*files)
        return [c for c in LANGUAGES if c in have] + sorted(have - set(LANGUAGES))

    def missing_reason(self, language: str) -> str:
        """Why ``language`` has no text here, for check_available's one line."""
        dirs = self._dirs()
        holding = [d / f.name for d in dirs for c, f in self._files(d).items() if c == language]
        if holding:
            lacking = [str(d) for d in dirs if language not in self._files(d)]
            return (f"{' and '.join(lacking)} has no {language}.* file while {holding[0]} exists "
                    f"(each language needs a file in both calibration/ and evaluation/)")
        names = [f"{language}{ext}" for ext in EXTENSIONS]
        return f"no {', '.join(names[:-1])} or {names[-1]} in {' or '.join(str(d) for d in dirs)}"

    def source_files(self, language: str, split: str) -> list[Path]:
        """The file(s) a language and split are read from (their size and mtime key the token cache)."""
        path = self._files(self.root / split if self.per_split else self.root).get(language)
        return [path] if path else []

    def texts(self, language: str, split: str) -> list[str]:
        check_split(split)
        check_available(self, [language], f"local corpus {self.root}")
        path = self.source_files(language, split)[0]
        docs = read_documents(path, self.text_field)
        if not docs:
            raise ValueError(f"{path} holds no text (no non-empty document)")
        if not self.per_split:
            if len(docs) < 2:
                raise ValueError(f"{path} has {len(docs)} document(s); one file "
                                 f"needs >= 2 to give disjoint calibration and evaluation splits")
            held = max(1, math.ceil(len(docs) * self.eval_fraction))
            docs = docs[-held:] if split == "evaluation" else docs[:-held]
        return capped(docs[: self.max_documents] if self.max_documents else docs, self.max_chars)


def read_documents(path: Path, text_field: str = "text") -> list[str]:
    """Non-empty documents of one file, in file order; a file that cannot be read as promised is named in one line."""
    if path.suffix == ".parquet":
        docs = _read_parquet(path, text_field)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); "
                             f"re-encode it as UTF-8") from None
        docs = re.split(r"\n\s*\n", text) if path.suffix == ".txt" else _read_jsonl(path, text, text_field)
    docs = [d.strip() for d in docs if d and d.strip()]
    for doc in docs:
        if "\x00" in doc:
            raise ValueError(f"{path} holds NUL bytes (binary data, not text): give UTF-8 text")
    return docs


def _read_jsonl(path: Path, text: str, text_field: str) -> list[str]:
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)[text_field]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not a JSON object with a {text_field!r} field ({err})") from None
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{path}:{number}: field {text_field!r} is a {type(value).__name__}, not a string")
        docs.append(value)
    return docs


def _read_parquet(path: Path, text_field: str) -> list[str]:
    require("pyarrow", "hub", f"reading {path}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path} is not a readable parquet file, it is corrupt or truncated "
                         f"({str(err).splitlines()[0][:120]})") from None
    if text_field not in schema.names:
        raise ValueError(f"{path}: no column {text_field!r}; it has: {', '.join(schema.names)}")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: column {text_field!r} holds {kind}, not strings")
    try:
        return pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path} is a corrupt parquet file ({str(err).splitlines()[0][:120]})") from None
