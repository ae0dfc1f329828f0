"""The command line: `mbs run` (here `python -m mbs run`, the console command's own entry) is `python run.py`, and
`mbs.run()` is the same run in Python; `--help` is MBS's own text."""
import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

import mbs
from conftest import CONF, ROOT, SWEEP_TINY, run_py
from mbs.launch import GROUPS

TINY = ["model=tiny-llama", "logger=none", "sampler.segments=12", "eval.languages=[en,sw]", "eval.max_windows=2",
        "analysis.layers=[]"]
ENV = {**os.environ, "HYDRA_FULL_ERROR": "0"}


def mbs_run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mbs", "run", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def languages(results: dict) -> dict:
    return {row["language"]: (row["dense_ppl"], row["compressed_ppl"]) for row in results["languages"]}


@pytest.mark.slow
def test_mbs_run_and_mbs_run_in_python_are_python_run_py(tmp_path, monkeypatch):
    run_py(tmp_path / "script", *TINY)
    proc = mbs_run(f"hydra.run.dir={tmp_path / 'command'}", "progress=false", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"mbs: results in {tmp_path / 'command'}" in proc.stdout
    monkeypatch.chdir(tmp_path)  # the default output directory is relative, as the command's
    returned = mbs.run("progress=false", *TINY, output_dir=tmp_path / "python")
    script, command, python = (json.loads((tmp_path / d / "results.json").read_text())
                               for d in ("script", "command", "python"))
    assert returned == python
    assert script["experiment_id"] == command["experiment_id"] == python["experiment_id"]
    assert script["run"]["name"] == python["run"]["name"] == "tiny-llama · wanda 0.5 · mbs · seed 0"
    assert script["run"]["choices"] == command["run"]["choices"] == python["run"]["choices"]
    for other in (command, python):
        assert languages(other).keys() == {"en", "sw"}
        for language, (dense, compressed) in languages(script).items():
            assert languages(other)[language] == pytest.approx((dense, compressed), rel=1e-4)
    # with no output_dir, the command's default directory (outputs/<date>/<time>_<model>_<compressor>_<sampler>)
    mbs.run("progress=false", *TINY, "dry_run=true")
    assert not (tmp_path / "outputs").exists()  # a dry run writes nothing


def test_mbs_run_refuses_bad_input_in_one_line(tmp_path):
    proc = mbs_run("model=bloom-9000", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("mbs: error: unknown model 'bloom-9000'; available:")
    assert len(proc.stderr.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="unknown language code 'xx'"):
        mbs.run(*TINY, "eval.languages=[en,xx]", output_dir=tmp_path / "api")
    assert not (tmp_path / "api" / "results.json").exists()


@pytest.mark.slow
def test_mbs_run_multirun_sweeps_with_the_grids_sweeper(tmp_path):
    proc = mbs_run("-m", f"hydra.sweep.dir={tmp_path}", *SWEEP_TINY, "logger=none", "eval.max_windows=1",
                   "analysis.layers=[]", "compressor=wanda,magnitude")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = sorted(json.loads(p.read_text())["run"]["choices"]["compressor"] for p in tmp_path.rglob("results.json"))
    assert found == ["magnitude", "wanda"]


def help_text(*command) -> str:
    proc = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_lists_each_group_once_with_its_options_and_the_common_keys():
    text = help_text("run.py")
    assert help_text("-m", "mbs", "run") == text
    groups, keys = text.split("Groups (GROUP=OPTION)")[1].split("Common keys")
    entries = {}  # group -> its entry (the wrapped lines joined)
    for line in groups.splitlines()[1:]:
        if line.startswith("  ") and not line.startswith("   "):
            name = line.split()[0]
            entries[name] = line
        elif line.strip():
            entries[name] += " " + line.strip()
    assert list(entries) == list(GROUPS)  # model, data, ..., sweep, hydra/launcher; not model/distribution
    for group, entry in entries.items():
        if group.startswith("hydra/"):
            assert entry.endswith("basic, slurm, submitit_local, submitit_slurm")
            continue
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        assert entry.endswith(": " + ", ".join(options)), entry
    assert "[gemma3-270m]:" in entries["model"] and "[wanda]:" in entries["compressor"]
    assert "[none]:" in entries["zeroshot"]
    names = [line.split()[0] for line in keys.splitlines()[1:] if line.startswith("  ") and line[2] != " "]
    assert len(names) >= 10 and "seed" in names and "hydra.run.dir" in names
    configs = [mbs.compose(return_hydra_config=True), mbs.compose("compressor=gptq")]  # gptq: compressor.bits
    for name in names:  # every key named is a key of the run config
        assert any(OmegaConf.select(cfg, name, default="absent") != "absent" for cfg in configs), name
    assert "compressor.sparsity" in names and "sampler.segments" in names
    assert "_schema" not in text and "distribution" not in text and "== Config ==" not in text
    assert "zh-Hans" not in text  # no training-language distribution
    # an override shows in the choices; Hydra's own help stays one flag away
    assert "[gptq]:" in help_text("run.py", "compressor=gptq")
    hydra_help = subprocess.run([sys.executable, "run.py", "--hydra-help"], cwd=ROOT, capture_output=True, text=True,
                                timeout=120).stdout
    assert "== Flags ==" in hydra_help and "--multirun" in hydra_help
