"""The one on-disk cache every cache goes through (assembled GGUF, converted model, tokenizers, token streams, and
whatever later stages cache), so that a killed run, two runs at once or a damaged disk can cost time but never
change a result.

An entry is a directory ``<root>/<name>/`` holding its files and a manifest (``mbs-manifest.json``: size and
xxh3-128 digest of every file). It is built under a lock (``.<name>.lock``, which concurrent runs wait for, on any
host sharing the file system) into a temporary sibling (``.<name>.tmp<pid>``) whose manifest is written last, and
published with one rename: a reader sees a whole entry or none. Every load checks sizes and digests (xxh3 of the
converted default model's 536 MB weights: 0.09 s from the page cache, 1.3-2 s with 2 cores shared by ~30 processes);
an entry that fails is reported in one warning line and rebuilt, never used. The digest detects corruption, it is
not a defence against someone who can write the cache. Temporaries are only ever written under the entry's lock, so
whoever holds the lock removes any it finds: they were left by killed runs. A cache that cannot be written (read-only,
full) is reported once and the run goes on uncached: entries are built in a private temporary directory.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from mbs.atomic import atomic_path, atomic_write

log = logging.getLogger(__name__)

MANIFEST = "mbs-manifest.json"
FORMAT = 1  # of the manifest
_CHUNK = 1 << 24
_verified: dict[str, tuple] = {}  # entry -> the _stamp of its files when this process last checked it
_warned_unwritable: set[Path] = set()  # one warning per cache (and the caches inside it)


def file_digest(path: str | Path) -> str:
    """xxh3-128 of a file's bytes: fast enough to check on every load, and any changed byte shows."""
    import xxhash

    digest, buffer = xxhash.xxh3_128(), bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def _stamp(directory: Path) -> tuple:
    """Each file's name, size, inode and mtime: a change to any of them means checking the digests again."""
    return tuple((str(p), s.st_size, s.st_ino, s.st_mtime_ns)
                 for p in sorted(directory.rglob("*")) if p.is_file() for s in [p.stat()])


def manifest_of(directory: Path) -> dict[str, Any]:
    return {rel: {"size": (directory / rel).stat().st_size, "xxh3_128": file_digest(directory / rel)}
            for rel in _files(directory)}


def damage(directory: Path) -> str | None:
    """Why an entry cannot be used (missing file, wrong size, changed bytes, ...), or None if it checks out."""
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            return f"in an unknown manifest format {manifest.get('format')!r}"
    except FileNotFoundError:
        return f"without a checksum manifest ({MANIFEST}; written by an older MBS or by hand)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"with an unreadable manifest ({type(err).__name__})"
    extra = sorted(set(_files(directory)) - set(files))
    if extra:
        return f"holding files its manifest does not list ({', '.join(extra[:3])})"
    for rel, want in files.items():
        path = directory / rel
        if not path.is_file():
            return f"missing {rel}"
        if path.stat().st_size != want["size"]:
            return f"damaged: {rel} has {path.stat().st_size} bytes, {want['size']} were written"
    for rel, want in files.items():  # sizes first: a truncated file is named without reading the others
        if file_digest(directory / rel) != want["xxh3_128"]:
            return f"damaged: the bytes of {rel} changed since it was written (checksum mismatch)"
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclass
class Cache:
    """A cache directory (``$MBS_CACHE`` or a configured one); ``entry`` is the only way in."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser()

    def lookup(self, name: str) -> Path | None:
        """The entry if it exists and checks out, else None (a damaged one is reported when ``entry`` rebuilds it)."""
        path = self.root / name
        if not path.is_dir():
            return None
        stamp = _stamp(path)
        if _verified.get(str(path)) != stamp:  # else checked earlier in this process, and no file changed since
            if damage(path) is not None:
                return None
            _verified[str(path)] = stamp
        self._sweep(path, blocking=False)
        return path

    def entry(self, name: str, build: Callable[[Path], None], what: str = "", rebuild: bool = False) -> Path:
        """The directory of a checked entry, built by ``build(directory)`` if it is missing or damaged (or always,
        replacing it, with ``rebuild``: a run asked to recompute).

        ``build`` fills an empty directory; it runs at most once across concurrent runs (the others wait for the
        lock, then find the entry). Unwritable cache: built into a private temporary directory, with a warning."""
        what = what or name
        found = None if rebuild else self.lookup(name)
        if found is not None:
            return found
        path = self.root / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = self._lock(path)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                log.info("cache: waiting for another run to finish building %s (%s)", what, path)
                lock.acquire()
        except OSError as err:
            return self._uncached(name, build, what, err)
        try:
            if not rebuild and self.lookup(name) is not None:  # another run built it while this one waited
                return path
            self._sweep(path, blocking=True)
            if rebuild and (path.exists() or path.is_symlink()):
                log.info("cache: recomputing %s (%s)", what, path)
                _remove(path)
            elif path.exists() or path.is_symlink():
                reason = damage(path) if path.is_dir() else "not a directory"
                log.warning("cache: %s at %s is %s; rebuilding it", what, path, reason)
                _remove(path)
            try:
                with atomic_path(path) as tmp:
                    tmp.mkdir()
                    build(tmp)
                    atomic_write(tmp / MANIFEST, json.dumps({"format": FORMAT, "what": what,
                                                             "files": manifest_of(tmp)}, indent=1))
            except (OSError, *_write_errors()) as err:  # a full or read-only disk, whichever library wrote
                if path.exists():
                    raise
                return self._uncached(name, build, what, err)
            _verified[str(path)] = _stamp(path)
            return path
        finally:
            lock.release()

    @staticmethod
    def _lock(path: Path) -> FileLock:
        return FileLock(str(path.with_name(f".{path.name}.lock")))

    def _sweep(self, path: Path, blocking: bool) -> None:
        """Remove temporaries of ``path`` left by killed runs. Only a lock holder writes them, so while this run
        holds the lock every one is stale, whatever host or pid made it; ``blocking=False`` skips if it is busy."""
        stale = [p for pattern in (f".{path.name}.tmp*", f"{path.name}.tmp*") for p in path.parent.glob(pattern)]
        if not stale:
            return
        if not blocking:
            lock = self._lock(path)
            try:
                lock.acquire(timeout=0)
            except (Timeout, OSError):
                return
            try:
                self._sweep(path, blocking=True)
            finally:
                lock.release()
            return
        for p in stale:
            log.info("cache: removing %s, left by a killed run", p)
            _remove(p)

    def _uncached(self, name: str, build: Callable[[Path], None], what: str, err: Exception) -> Path:
        if not any(w == self.root or w in self.root.parents or self.root in w.parents for w in _warned_unwritable):
            _warned_unwritable.add(self.root)
            log.warning("cache: cannot write %s (%s: %s); running uncached, so this run rebuilds %s and every "
                        "later cache entry itself (set MBS_CACHE to a writable directory to keep them)",
                        self.root, type(err).__name__, getattr(err, "strerror", None) or err, what)
        scratch = Path(tempfile.mkdtemp(prefix="mbs-uncached-"))
        atexit.register(shutil.rmtree, scratch, True)
        path = scratch / Path(name).name
        path.mkdir()
        build(path)
        return path


def _write_errors() -> tuple[type[Exception], ...]:
    """What libraries that write entries raise for a failed write: safetensors reports a full disk as a
    SafetensorError (an IoError inside), not an OSError; an entry's build only writes safetensors files."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        return ()
    return (SafetensorError,)


def cache_dir(configured: str | Path) -> Path:
    """The cache root: $MBS_CACHE if set, else the configured directory."""
    return Path(os.environ.get("MBS_CACHE") or configured).expanduser()
