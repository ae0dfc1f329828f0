"""Writing files so a reader never sees half of one and an interrupted run never corrupts what was there before:
everything is written to a temporary sibling and renamed over the target in one step."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _temporary(path: Path) -> Path:
    """The temporary sibling a write goes to before it is renamed over ``path``."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (a file or a directory); on success it replaces ``path`` with
    one rename, on any error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
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
    """Several text files that appear together or not at all, the LAST key being the set's commit marker (e.g.
    results.json, which resume and the report look for). Every file is written and synced to a temporary first (a
    full disk fails here, before any target changes); then an existing marker is removed, the others are renamed
    and the marker is renamed last. A kill at any point leaves the old set, files without a marker (which readers
    ignore and the next write replaces, with the killed write's temporaries), or the new set: never new files beside
    an old marker. On an error the temporaries and the files already renamed are removed."""
    paths = [Path(p) for p in files]
    marker, temps, renamed = paths[-1], {}, []
    for path in paths:  # temporaries of a killed earlier write (one writer per set: a run's own directory)
        for stale in path.parent.glob(f".{path.name}.tmp*") if path.parent.is_dir() else []:
            stale.unlink(missing_ok=True)
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            temps[path] = _temporary(path)
            _write_synced(temps[path], files[path])
        marker.unlink(missing_ok=True)  # from here until the last rename, the set has no marker
        for path in paths:
            os.replace(temps[path], path)
            del temps[path]
            renamed.append(path)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        if marker not in renamed:
            for path in renamed:
                path.unlink(missing_ok=True)
        raise
