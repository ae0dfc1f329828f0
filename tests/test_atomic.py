import pytest

from mbs.atomic import atomic_path, atomic_write


def test_an_interrupted_write_leaves_the_old_file_and_no_debris(tmp_path):
    target = tmp_path / "results.json"
    atomic_write(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    atomic_write(target, "new")
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_a_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "converted"
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text("{}")
            raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").read_text() == "{}" and len(list(tmp_path.iterdir())) == 1


KILL_AFTER_RENAMES = """
import os, sys
from pathlib import Path
import mbs.atomic as atomic

real, left = os.replace, int(sys.argv[2])
def replace(src, dst):
    global left
    if left == 0:
        os._exit(9)  # killed between two renames: no handler runs
    left -= 1
    real(src, dst)
atomic.os.replace = replace
d = Path(sys.argv[1])
atomic.atomic_write_all({d / "results.csv": "new", d / "results.md": "new", d / "results.json": "new"})
"""


@pytest.mark.parametrize("renamed", [0, 1, 2])
def test_a_kill_between_the_renames_never_leaves_new_files_beside_an_old_marker(tmp_path, renamed):
    """results.json is the commit marker, renamed last and removed before the first rename: after a kill anywhere,
    what has a results.json is one whole set, and what has none is not read as a result (the job is incomplete)."""
    import subprocess
    import sys

    from mbs.atomic import atomic_write_all
    from mbs.record.jobs import _job_from_dir

    files = {tmp_path / n: "old" for n in ("results.csv", "results.md", "results.json")}
    atomic_write_all(files)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("[]\n")
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_RENAMES, str(tmp_path), str(renamed)])
    assert proc.returncode == 9
    assert not (tmp_path / "results.json").exists()
    assert [(tmp_path / n).read_text() for n in ("results.csv", "results.md")][:renamed] == ["new"] * renamed
    assert _job_from_dir(tmp_path).status == "incomplete"
    atomic_write_all({p: "again" for p in files})  # the next write replaces the partial set and its debris
    assert {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()} == {p.name: "again" for p in files}


def test_an_error_between_the_renames_removes_the_partial_set(tmp_path, monkeypatch):
    import mbs.atomic

    real, calls = mbs.atomic.os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("I/O error")
        real(src, dst)

    monkeypatch.setattr(mbs.atomic.os, "replace", replace)
    with pytest.raises(OSError):
        mbs.atomic.atomic_write_all({tmp_path / "results.csv": "a", tmp_path / "results.md": "b",
                                     tmp_path / "results.json": "c"})
    assert list(tmp_path.iterdir()) == []
