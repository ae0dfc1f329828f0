"""The benchmark scripts run end to end on the tiny model (their figures are not asserted: speed is for benchmarks,
not tests; their own equivalence checks between the two paths are)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # benchmark scripts in subprocesses (deselect: -m "not slow")


@pytest.mark.parametrize("script, args, rows", [
    ("compressors.py", ["--only", "wanda-2:4,sparsegpt,gptq-4b", "--segments", "32"],
     ["wanda-2:4", "sparsegpt", "gptq-4b"]),
    ("evaluation.py", ["--languages", "en,sw"], ["en", "sw", "speed-up"]),
    ("sweep.py", ["--mixtures", "english,hi only", "--pool", "8"],
     ["cached mode, statistics_pool=8 vs the sequential engine", "tables identical: True"]),
    ("similarity_separability.py", ["--windows", "2"], ["per statistic", "log_mean_square_centred"]),
    ("language_aware_pruning.py", ["--methods", "wanda,wanda+owl", "--sparsities", "0.7", "--seeds", "0"],
     ["| wanda+owl | 70% |", "wanda+owl vs wanda at 70%, low-resource", "figure and runs"]),
    ("quantizers.py", ["--methods", "awq,rtn", "--bits", "3", "--calibrations", "english,uniform", "--max-windows", "2"],
     ["| awq | 3 | english |", "| awq | 3 | uniform |", "| rtn | 3 | any |", "| language | awq 3b english"]),
    ("self_calibration.py", ["--seeds", "0", "--methods", "wanda", "--mixtures", "mbs"],
     ["| Wanda 50% | mbs | self |", "| Wanda 50% | mbs | udhr |", "across languages: self/UDHR",
      "Spearman between dense perplexity", "figure and runs"]),
    ("mixture_value.py", ["--seeds", "0", "--methods", "wanda"],
     ["| Wanda 50% | optimized |", "| Wanda 50% | uniform |", "worst language: optimized", "cost: the search took"]),
    ("mixture_value.py", ["--seeds", "0", "--methods", "wanda", "--objective", "mean"],
     ["the search's objective: mean", "| Wanda 50% | optimized |", "all languages: optimized"]),
    ("damage_prediction.py", ["--mixtures", "english,sw only", "--probe", "3"],
     ["| english | 0 | 5 |", "| sw only | 0 | 5 |", "within language and run (2 runs, 5 languages, n = 10 points)",
      "| predicted log ratio | ", "| output error (mean) | ", "on 3 probe segment(s) per language", "risk records"]),
    ("streaming_memory.py", ["--layers", "4", "--methods", "gptq"],
     ["| gptq | 4 | 0.00 GB | streamed |", "gptq, 4 layers: streamed perplexities bit-identical to in-memory: True"]),
])
def test_benchmark_runs_on_the_tiny_model(script, args, rows, mbs_cache):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for row in rows:
        assert any(row in line for line in lines), proc.stdout


@pytest.mark.skipif(not os.access("/sys/fs/cgroup/memory", os.W_OK), reason="needs a writable cgroup v1 memory controller")
def test_streaming_benchmark_reports_a_run_the_memory_limit_killed(mbs_cache, tmp_path):
    """Under --cap each measurement runs in its own cgroup: one that needs more than the limit is reported as killed
    (not a crash of the benchmark), and the cgroup and the killed run's offload folder are removed after."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "streaming_memory.py"), "--tiny", "--layers",
                             "2", "--modes", "streamed", "--cap", "0.15"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "| wanda | 2 | 0.00 GB | streamed | killed by the limit |" in out, out
    assert not list(Path("/sys/fs/cgroup/memory").glob(f"mbs-streaming-bench-{proc.pid}-*"))  # its own, removed
    left = [p.name for p in tmp_path.iterdir() if p.name != "torchinductor_root"]  # torch's own compile cache
    assert not left  # no offload folder or checkpoint left behind


def test_a_search_that_returned_a_start_reuses_that_starts_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from mixture_value import returned_start
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import yaml

    starts = {"mbs": {"en": 3, "sw": 1}, "uniform": {"en": 2, "sw": 2}, "english": {"en": 4}}
    path = tmp_path / "optimized.yaml"
    for counts, want in (({"en": 2, "sw": 2}, "uniform"), ({"en": 3, "sw": 1}, "mbs"), ({"en": 1, "sw": 3}, None),
                         ({"en": 4}, None)):  # English-only is not among the benchmark's runs
        path.write_text(yaml.safe_dump({"per_language": counts, "starting_points": starts}))
        assert returned_start(path) == want
