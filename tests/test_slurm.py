"""A sweep through conf/hydra/launcher/slurm.yaml on a real SLURM cluster: jobs run as SLURM array tasks, one fails
alone, the summary names it, and a re-run submits nothing. Needs the throw-away cluster of tests/slurm/cluster.sh
(`.ci/run` starts one when it can); skipped without it."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import multirun

from mbs.record.jobs import collect_jobs

pytestmark = pytest.mark.slurm
CLUSTER = os.environ.get("MBS_SLURM_CLUSTER")
START = 'as root: eval "$(tests/slurm/cluster.sh up)"'


@pytest.fixture
def slurm(monkeypatch):
    """SLURM_CONF of the test cluster; skips when none was started, fails when the one named does not answer."""
    if not CLUSTER:
        pytest.skip(f"no test SLURM cluster (MBS_SLURM_CLUSTER is unset; {START})")
    conf = Path(CLUSTER) / "slurm.conf"
    monkeypatch.setenv("SLURM_CONF", str(conf))
    proc = subprocess.run(["sinfo", "-h", "-p", "cpu", "-o", "%t"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.split(), f"test cluster {CLUSTER} does not answer: {proc.stderr}"
    return conf


def slurm_jobs() -> list[tuple[str, str]]:
    """(job id, state) of every job the cluster has run, from accounting (what submitit polls), once none is still
    ending: submitit returns as soon as a job's result file is written, while its process may still be exiting."""
    for _ in range(120):
        proc = subprocess.run(["sacct", "-n", "-X", "-a", "-S", "2000-01-01", "-o", "JobID,State", "--parsable2"],
                              capture_output=True, text=True, timeout=30, check=True)
        jobs = [tuple(line.split("|")) for line in proc.stdout.splitlines() if line]
        if not any(state in ("PENDING", "RUNNING", "COMPLETING") for _, state in jobs):
            return jobs
        time.sleep(0.5)
    raise AssertionError(f"jobs still not ended after 60 s: {jobs}")


def test_sweep_on_slurm_runs_fails_alone_and_resumes_without_submitting(slurm, tmp_path):
    venv = Path(sys.prefix) / "bin" / "activate"
    launcher = ["hydra/launcher=slurm", "hydra.launcher.partition=cpu", "hydra.launcher.gpus_per_node=0",
                "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10",
                *([f'hydra.launcher.setup=["source {venv}"]'] if venv.exists() else []), "logger=none",
                "compressor=magnitude"]
    before = slurm_jobs()
    # two jobs that finish and one that fails at run time (its input check runs inside the job)
    proc = multirun(tmp_path, *launcher, "compressor.sparsity=0.3,0.5,1.0", timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "Bypassing sacct error" not in out  # submitit's polling found the jobs in accounting
    assert "3 jobs: 2 done, 1 failed" in proc.stderr
    assert "compressor.sparsity=1.0 is outside [0, 1)" in proc.stderr.split("3 jobs:")[1]

    # all three ran on the cluster, as one array job whose tasks completed (a failing run still ends normally)
    new = [job for job in slurm_jobs() if job not in before]
    assert len(new) == 3 and {state for _, state in new} == {"COMPLETED"}, new
    array_id = new[0][0].split("_")[0]
    submitit = sorted(p.name for p in (tmp_path / ".submitit").iterdir())
    assert {f"{array_id}_{i}" for i in range(3)} <= set(submitit)  # each task's logs and pickles

    jobs = {job.overrides[-1]: job for job in collect_jobs(tmp_path)}
    for sparsity in ("0.3", "0.5"):
        job = jobs[f"compressor.sparsity={sparsity}"]
        assert job.status == "done"
        assert job.results.compression["sparsity"] == pytest.approx(float(sparsity), abs=0.01)
        assert [row["language"] for row in job.results.languages] == ["en", "sw"]
    failed = jobs["compressor.sparsity=1.0"]
    assert failed.status == "failed" and not (failed.directory / "results.json").exists()
    failure = json.loads((failed.directory / "failure.json").read_text())
    assert failure["error"]["type"] == "UserError" and "compressor.sparsity=1.0" in failure["job"]["overrides"]

    # resume: the finished jobs are not submitted again, and their results stay as they were
    results = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.glob("*/results.json")}
    submitted = slurm_jobs()
    proc = multirun(tmp_path, *launcher, "compressor.sparsity=0.3,0.5", timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert proc.stdout.count("mbs: skipped job") == 2
    assert "3 jobs: 2 done (and 1 earlier jobs not in this plan)" in proc.stdout
    assert slurm_jobs() == submitted
    assert sorted(p.name for p in (tmp_path / ".submitit").iterdir()) == submitit  # no new submission file
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.glob("*/results.json")} == results
