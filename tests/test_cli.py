"""The sweep-directory commands share one convention (mbs/cli.py): the same arguments, the same one-line errors and
exit codes, reachable as ``python -m mbs <command>``, ``python -m mbs.<command>`` and ``mbs-<command>``."""
import subprocess
import sys
from pathlib import Path

import pytest

from mbs import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_a_missing_directory_is_one_line_and_exit_2(name, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert cli.main(name, [str(missing)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"mbs-{name}: sweep directory {missing} does not exist"]


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_takes_a_sweep_dir_and_out(name):
    args = cli.parser_for(name).parse_args(["multirun/x", "--out", "elsewhere"])
    assert (args.sweep_dir, args.out) == ("multirun/x", "elsewhere")


def test_python_m_mbs_names_its_commands_and_runs_them(tmp_path):
    usage = subprocess.run([sys.executable, "-m", "mbs"], cwd=ROOT, capture_output=True, text=True)
    assert usage.returncode == 2 and "report, analyze" in usage.stderr
    for how in (["-m", "mbs", "report"], ["-m", "mbs.report"]):
        proc = subprocess.run([sys.executable, *how, str(tmp_path / "nope")], cwd=ROOT, capture_output=True,
                              text=True)
        assert proc.returncode == 2 and proc.stderr.strip().endswith("does not exist"), proc.stderr
