"""A wheel install works away from the checkout: the wheel carries the configs (mbs/conf, found by Hydra as
pkg://mbs.conf), the sweeps and the grids sweeper, and `mbs run`, `mbs report` and `mbs.run()` use them.

The wheel is built offline from this checkout (``pip wheel --no-build-isolation``: the running interpreter's
setuptools) and installed with ``--no-deps`` into a fresh venv that sees this interpreter's packages through a .pth
file, so nothing is downloaded. On a shared machine run it under your heavy-process lock; it takes about a minute."""
import json
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT

TINY = ["model=tiny-llama", "logger=none", "sampler.segments=12", "eval.languages=[en,sw]", "eval.max_windows=2",
        "analysis.layers=[]", "progress=false"]


def build_wheel(out: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    wheels = list(out.glob("mbs-*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        pytest.skip(f"cannot build the wheel offline here (pip wheel exit {proc.returncode}): {proc.stderr[-500:]}")
    return wheels[0]


def fresh_venv(path: Path) -> Path:
    """A venv without the checkout on its path whose dependencies are this interpreter's installed packages."""
    proc = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"cannot create a venv here: {proc.stderr[-500:]}")
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (Path(purelib) / "_mbs_test_dependencies.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    return python


@pytest.mark.slow
def test_wheel_install_runs_away_from_the_checkout(tmp_path):
    wheel = build_wheel(tmp_path / "wheel")
    python = fresh_venv(tmp_path / "venv")
    # --ignore-installed: the dependencies' site-packages may hold a (editable) mbs; it is neither used nor touched
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                              "--ignore-installed", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    bin_dir = python.parent
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HYDRA_FULL_ERROR="0", PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")

    def run(*args, timeout=300):
        proc = subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-3000:])
        return proc.stdout

    where = run(str(python), "-c", "import mbs, mbs.conf, pathlib; print(pathlib.Path(mbs.__file__).parent); "
                                   "print(pathlib.Path(mbs.conf.__file__).parent)")
    package, conf = (Path(line) for line in where.split())
    assert package.is_relative_to(tmp_path / "venv") and not package.is_relative_to(ROOT)
    assert (conf / "config.yaml").is_file() and (conf / "sweep" / "demo.yaml").is_file()
    assert not (conf / "sweep").is_symlink()  # the wheel carries the sweeps' files, not a link into a checkout

    out = run(str(bin_dir / "mbs"), "run", *TINY, "hydra.run.dir=single")
    assert f"mbs: results in {work / 'single'}" in out
    single = json.loads((work / "single" / "results.json").read_text())
    assert single["run"]["name"] == "tiny-llama · wanda 0.5 · mbs · seed 0"
    assert (work / "single" / ".hydra" / "config.yaml").is_file() and (work / "single" / "run.log").is_file()

    run(str(bin_dir / "mbs"), "run", "-m", *TINY, "hydra.sweep.dir=sweep", "compressor=wanda,magnitude")
    found = sorted(json.loads(p.read_text())["run"]["choices"]["compressor"]
                   for p in (work / "sweep").rglob("results.json"))
    assert found == ["magnitude", "wanda"]  # the grids sweeper (hydra_plugins.mbs_sweeper) came with the wheel
    assert "wrote" in run(str(bin_dir / "mbs"), "report", "sweep")
    assert "wrote" in run(str(bin_dir / "mbs-report"), "sweep", "--out", "report2")

    text = " ".join(run(str(bin_dir / "mbs"), "run", "--help").split())  # the option lists are wrapped
    assert "calibration_mixtures, calibration_mixtures_quick, demo" in text and "tiny-llama" in text

    code = ("import json, mbs; r = mbs.run(" + ", ".join(repr(a) for a in TINY) + ", output_dir='api'); "
            "print(json.dumps([r['experiment_id'], r['run']['name']]))")
    experiment_id, name = json.loads(run(str(python), "-c", code).splitlines()[-1])
    assert experiment_id == single["experiment_id"] and name == single["run"]["name"]
    assert (work / "api" / "results.json").is_file()
