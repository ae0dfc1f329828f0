"""Runs inside the benchmark's own llm-compressor virtual environment (never the project's): loads the dense model,
times ``oneshot`` on the calibration token ids it is given, and writes the effective weights of every compressed
Linear (pruned, or quantized and de-quantized), and for AWQ every decoder-layer norm (its scales fold into them), for
the project's side to evaluate. Called by benchmarks/peers.py.

    python llmcompressor_worker.py MODEL_DIR CALIBRATION.safetensors METHOD OUT.safetensors OUT.json
"""
from __future__ import annotations

import json
import sys
import time

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


def recipe(method: str):
    if method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(sparsity=0.5, mask_structure="0:0", targets=["Linear"], ignore=["lm_head"])
    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return SparseGPTModifier(sparsity=0.5, mask_structure="0:0", block_size=128, dampening_frac=0.01,
                                 targets=["Linear"], ignore=["lm_head"])
    if method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        return GPTQModifier(scheme="W4A16", targets=["Linear"], ignore=["lm_head"], block_size=128,
                            dampening_frac=0.01)  # W4A16: 4-bit symmetric, groups of 128; act-order "static" default
    if method == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        # W4A16_ASYM: 4-bit with a zero point, groups of 128 (the AWQ reference's setting); the model's own mappings
        return AWQModifier(scheme="W4A16_ASYM", targets=["Linear"], ignore=["lm_head"])
    raise SystemExit(f"unknown method {method!r}; allowed: wanda, sparsegpt, gptq, awq")


def effective_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight the module computes with. GPTQ writes its rounded weights into ``weight``; AWQ only smooths
    ``weight`` and leaves the rounding to the quantized forward (its ``weight_scale`` and ``weight_zero_point``), so
    the weight is put through that same fake quantization here."""
    weight = module.weight.detach()
    scheme = getattr(module, "quantization_scheme", None)
    if scheme is None or scheme.weights is None or not hasattr(module, "weight_scale"):
        return weight
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    return fake_quantize(weight, module.weight_scale, getattr(module, "weight_zero_point", None), scheme.weights)


def main() -> None:
    model_dir, calibration_file, method, out_weights, out_json = sys.argv[1:6]
    torch.manual_seed(0)
    ids = load_file(calibration_file)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model.eval()
    from llmcompressor import oneshot

    if not torch.cuda.is_available():  # 0.14's AWQ pins its cached activations for host-to-GPU copies, which raises
        from llmcompressor.pipelines.cache import IntermediatesCache  # without an accelerator; on a CPU there is no copy

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None

    t0 = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe(method), num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            weights[f"{name}.weight"] = effective_weight(module).to(torch.bfloat16).contiguous()
        elif method == "awq" and ".layers." in name and "norm" in type(module).__name__.lower():
            weights[f"{name}.weight"] = module.weight.detach().to(torch.bfloat16).contiguous()  # its scales fold here
    save_file(weights, out_weights)
    import llmcompressor
    import transformers

    json.dump({"seconds": seconds, "llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
               "torch": torch.__version__, "threads": torch.get_num_threads(), "modules": len(weights)},
              open(out_json, "w"))


if __name__ == "__main__":
    main()
