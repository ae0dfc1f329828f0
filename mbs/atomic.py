"""Writing files so a reader never sees half of one and an interrupted run never corrupts what was there before:
everything is written to a temporary sibling and renamed over the target in one step."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (a file or a directory); on success it replaces ``path`` with
    one rename, on any error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str | Path, text: str) -> None:
    """A text file, synced to disk before it replaces ``path``."""
    with atomic_path(path) as tmp:
        _write_synced(tmp, text)


def atomic_write_all(files: dict[Path, str]) -> None:
    """Several text files that appear together or not at all: every one is written and synced to a temporary first
    (a full disk fails here, before any target changes), then all are renamed, the LAST key last (a marker of
    completeness, e.g. results.json, which resume looks for)."""
    with ExitStack() as stack:
        temps = {path: stack.enter_context(atomic_path(path)) for path in reversed(list(files))}
        for path, tmp in temps.items():
            _write_synced(tmp, files[path])
