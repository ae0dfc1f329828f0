import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if "OMP_NUM_THREADS" not in os.environ:
    # pytest-xdist workers share the cores: each (and the run.py processes it starts) gets its share, so that
    # threads do not oversubscribe them; an explicit OMP_NUM_THREADS is kept (the suite must pass with 1 and 2)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["OMP_NUM_THREADS"] = str(max(1, min(2, len(os.sched_getaffinity(0)) // workers)))
torch.set_num_threads(min(2, int(os.environ["OMP_NUM_THREADS"])))

ARCHS = ("bloom", "llama", "gemma3")
ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SWEEP_TINY = ["model=tiny-llama", "sampler.segments=20", "eval.languages=[en,sw]", "progress=false"]


@pytest.fixture(scope="session", autouse=True)
def mbs_cache(tmp_path_factory):
    """Tiny tokenizers are built into a per-session cache, never into the user's."""
    path = tmp_path_factory.mktemp("mbs-cache")
    os.environ["MBS_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(mbs_cache):
    from mbs.models.tiny import tiny_tokenizer

    return tiny_tokenizer(mbs_cache)


def tiny(arch: str, seed: int = 0):
    from mbs.models.tiny import tiny_model

    return tiny_model(arch, {}, seed=seed).eval().requires_grad_(False)


def calibration(tokenizer, counts=None, seqlen=32, seed=0, bos=True):
    from mbs.data.calibration import build_calibration
    from mbs.data.corpora import UDHRCorpus

    return build_calibration(tokenizer, UDHRCorpus(), counts or {"en": 3, "sw": 2, "fr": 3}, seqlen, seed, bos)


def replay(adapter, batches):
    """Every batch through the engine's captured inputs and every layer in turn: the final hidden states."""
    from mbs.compress.engine import capture, run_layer

    captured = capture(adapter, batches, "cpu")
    hidden = captured.inputs
    for i, layer in enumerate(adapter.layers):
        hidden = run_layer(layer, adapter, hidden, captured.layer_kwargs[i])
    return captured, hidden


def compose_run(*overrides):
    """The run config as ``python run.py <overrides>`` composes it."""
    from hydra import compose, initialize_config_dir

    from mbs.config import register

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def run_py(tmp_path, *overrides, check=True):
    """``python run.py`` in a subprocess, writing into tmp_path."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={tmp_path}", "progress=false", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def multirun(sweep_dir, *overrides, timeout=300):
    """``python run.py --multirun`` of the tiny model into sweep_dir."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "run.py", "--multirun", f"hydra.sweep.dir={sweep_dir}", *SWEEP_TINY,
                           *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
