"""Runs that survive a full disk, ids that mean "comparable", and bad input found before anything loads (issue 11)."""
import errno
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir

import mbs.atomic
import mbs.config
import mbs.pipeline
from mbs.models.spec import ModelSpec
from mbs.record.loggers import NoLogger
from mbs.fingerprint import experiment_id
from mbs.record.jobs import find_results

CONF = str(Path(__file__).resolve().parents[1] / "conf")
TINY = ["model=tiny-llama", "logger=none", "sampler.segments=8", "eval.languages=[en,sw]", "eval.max_windows=2",
        "progress=false", "analysis.statistic=mean_square"]


def composed(*overrides):
    mbs.config.register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_a_full_disk_at_the_end_keeps_the_table_and_the_log_and_writes_no_partial_results(tmp_path, monkeypatch,
                                                                                         capsys):
    logged = []
    monkeypatch.setattr(NoLogger, "log_results", lambda self, results: logged.append(results))
    real = mbs.atomic._write_synced

    def disk_full_at_md(path, text):
        if "results.md" in path.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(mbs.atomic, "_write_synced", disk_full_at_md)
    with pytest.raises(mbs.pipeline.ResultsNotWritten, match="No space left on device") as err:
        mbs.pipeline.run(composed(*TINY), tmp_path)
    assert "\n" not in str(err.value)
    assert "| en |" in capsys.readouterr().out and len(logged) == 1  # printed and logged before the files
    left = [p.name for p in tmp_path.iterdir()]  # no results.csv without results.json, no temporaries
    assert not [n for n in left if n.startswith(("results", ".")) or ".tmp" in n], left
    monkeypatch.setattr(mbs.atomic, "_write_synced", real)
    mbs.atomic.atomic_write_all({tmp_path / "a.csv": "a", tmp_path / "results.json": "{}"})
    assert sorted(set(p.name for p in tmp_path.iterdir()) - set(left)) == ["a.csv", "results.json"]


def test_an_unwritable_output_directory_fails_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(mbs.pipeline, "prepare", lambda cfg: pytest.fail("prepared before checking the output"))
    with pytest.raises(mbs.pipeline.UserError, match="output directory .*file/run is not writable"):
        mbs.pipeline.run(composed(*TINY), tmp_path / "file" / "run")


def test_experiment_id_covers_threads_and_local_file_contents(tmp_path):
    """Runs with another thread count (issue 11: bn dense 80.15 vs 81.16 with 1 vs 2 threads) and with an edited
    data=local file shared an id, so resume mixed them in; both now change the id, so resume re-runs them."""
    threads = torch.get_num_threads()
    base = experiment_id(composed(*TINY))
    try:
        torch.set_num_threads(threads + 1)
        assert experiment_id(composed(*TINY)) != base
    finally:
        torch.set_num_threads(threads)
    assert experiment_id(composed(*TINY)) == base

    for code in ("en", "sw"):
        (tmp_path / f"{code}.txt").write_text("\n\n".join(f"{code} document {i}" for i in range(20)))
    local = [*TINY, "data=local", f"data.path={tmp_path}"]
    before = experiment_id(composed(*local))
    (tmp_path / "sweep" / "0").mkdir(parents=True)
    (tmp_path / "sweep" / "0" / "results.json").write_text(json.dumps({"experiment_id": before}))
    stat = (tmp_path / "sw.txt").stat()
    text = (tmp_path / "sw.txt").read_text()
    (tmp_path / "sw.txt").write_text(text.replace("document 3", "document 4"))  # same size ...
    os.utime(tmp_path / "sw.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the same mtime
    after = experiment_id(composed(*local))
    assert after != before and find_results(tmp_path / "sweep", after) is None
    assert experiment_id(composed(*local, "hydra.job.name=x")) == after  # stable otherwise


def test_numeric_environment_names_the_machine_and_is_stable(monkeypatch):
    """The CPU and its float kernels are in the environment (and so in experiment ids and cache keys), nothing that
    changes between two runs on one machine is; a machine without /proc/cpuinfo still gets one."""
    import builtins
    import platform

    from mbs.fingerprint import _machine_environment, numeric_environment

    first = numeric_environment()
    assert set(first) >= {"threads", "torch", "transformers", "cpu", "machine", "cpu_flags", "cpu_capability", "blas",
                          "lapack", "mkl", "mkldnn", "omp_num_threads"}
    assert first["cpu"] and first["threads"] == torch.get_num_threads()
    assert set(first["cpu_flags"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma", "asimd", "sve",
                                       "sve2", "bf16"}
    assert first["omp_num_threads"] == os.environ.get("OMP_NUM_THREADS")
    assert numeric_environment() == first and json.dumps(first, sort_keys=True) == json.dumps(numeric_environment(),
                                                                                                sort_keys=True)
    assert numeric_environment("cpu") == first  # only a cuda device adds the GPU
    assert experiment_id(composed(*TINY)) == experiment_id(composed(*TINY))

    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    elsewhere = _machine_environment.__wrapped__()
    assert elsewhere["cpu"] == (platform.processor() or platform.machine()) and elsewhere["cpu_flags"] == []
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert numeric_environment()["omp_num_threads"] == "3"


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def local_data(tmp_path: Path, bad_name: str, bad: bytes) -> list[str]:
    write(tmp_path / "data" / "en.txt", "\n\n".join(f"en document {i}" for i in range(30)).encode())
    write(tmp_path / "data" / bad_name, bad)
    return [*TINY, "data=local", f"data.path={tmp_path / 'data'}"]


def good_parquet(path: Path) -> bytes:
    pq.write_table(pa.table({"text": [f"sw document {i}" for i in range(30)]}), path)
    return path.read_bytes()


@pytest.mark.parametrize("case, message", [
    ("jsonl_number", r"sw.jsonl:2: field 'text' is a int, not a string"),
    ("latin1", r"sw.txt is not UTF-8 text \(byte 5: invalid continuation byte\)"),
    ("corrupt_parquet", r"sw.parquet is not a readable parquet file, it is corrupt or truncated"),
])
def test_bad_local_files_are_one_line_naming_the_file(tmp_path, case, message):
    if case == "jsonl_number":
        overrides = local_data(tmp_path, "sw.jsonl", b'{"text": "a b c"}\n{"text": 5}\n{"text": "d"}\n')
    elif case == "latin1":
        overrides = local_data(tmp_path, "sw.txt", b"abcd \xe9t\xe9\n\n" * 40)
    else:
        blob = good_parquet(tmp_path / "good.parquet")
        overrides = local_data(tmp_path, "sw.parquet", blob[: len(blob) // 2])
    with pytest.raises(mbs.pipeline.UserError, match=message) as err:
        mbs.pipeline.prepare(composed(*overrides))
    assert "\n" not in str(err.value)


def test_local_model_directories_are_checked_before_loading(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ValueError, match=r"config.json is corrupt \(JSONDecodeError"):
        ModelSpec(name="m", source="hub", path=str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match=r"holds no weights \(\*.safetensors, pytorch_model\*.bin, \*.gguf\)"):
        ModelSpec(name="m", source="hub", path=str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")  # tests/test_bad_inputs.py: every broken weight file
    with pytest.raises(ValueError, match=r"model.safetensors is empty \(0 bytes\)"):
        ModelSpec(name="m", source="hub", path=str(tmp_path))


@pytest.mark.parametrize("overrides, message", [
    (["engine.device=gpu"], "engine.device='gpu' is not a device; allowed: cpu, cuda, cuda:N, mps"),
    (["engine.offload_device=cuda0"], "engine.offload_device='cuda0' is not a device"),
    (["engine.offload_device=cuda:1"], "engine.offload_device='cuda:1' but no CUDA device is available"),
    (["engine.device=mps"], "engine.device='mps' but no MPS device is available"),
    (["seed=-1"], "seed=-1 is out of range; allowed: an integer in 0..4294967295"),
    (["seed=4294967296"], "seed=4294967296 is out of range"),
    (["model=gemma3-270m", "model.gguf_package=os"], "model.gguf_package='os' is not a model package"),
])
def test_bad_settings_are_one_line_before_anything_loads(overrides, message):
    tiny = [o for o in TINY if not (o.startswith("model=") and any(x.startswith("model=") for x in overrides))]
    with pytest.raises(mbs.pipeline.UserError) as err:
        mbs.pipeline.prepare(composed(*tiny, *overrides))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_an_unwritable_cache_runs_uncached(tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MBS_CACHE", str(tmp_path / "file" / "cache"))
    prepared = mbs.pipeline.prepare(composed(*TINY))
    assert prepared.calibration.total == 8
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "running uncached" in warnings[0]
