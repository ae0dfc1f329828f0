"""Checks on directories MBS is asked to write into, before anything is written there."""
from __future__ import annotations

import tempfile
from pathlib import Path


def check_creatable(directory: str | Path, setting: str = "hydra.run.dir") -> None:
    """A ValueError in one line if ``directory`` cannot be made or written: its nearest existing ancestor must be a
    writable directory (a file on the way, a read-only disk, no permission). Creates nothing but a removed probe."""
    directory = Path(directory).expanduser()
    existing = directory
    while not (existing.exists() or existing.is_symlink()) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"the output directory {directory} cannot be made: {existing} is a file, not a directory; "
                         f"set {setting} to a writable directory")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".mbs-write-check"):
            pass
    except OSError as err:
        raise ValueError(f"the output directory {directory} is not writable ({existing}: {err.strerror or err}); "
                         f"set {setting} to a writable directory") from None
