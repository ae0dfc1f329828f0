"""Runs inside the vLLM CPU virtual environment (never the project's): loads each exported checkpoint with vLLM and
writes its prompt log-probabilities of the given token ids. Called by benchmarks/vllm_check.py.

    python vllm_worker.py IDS.json OUT.json CHECKPOINT_DIR [CHECKPOINT_DIR ...]
"""
from __future__ import annotations

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    ids_file, out_file, *directories = sys.argv[1:]
    ids = json.load(open(ids_file))
    results = {}
    for directory in directories:
        llm = LLM(model=directory, dtype="bfloat16", max_model_len=max(128, len(ids)), enforce_eager=True)
        output = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0))
        prompt = output[0].prompt_logprobs
        results[directory] = [prompt[i][ids[i]].logprob for i in range(1, len(ids))]
        del llm
    import vllm

    json.dump({"vllm": vllm.__version__, "logprobs": results}, open(out_file, "w"))


if __name__ == "__main__":  # vLLM starts its engine in a spawned process: the guard is required
    main()
