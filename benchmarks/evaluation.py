"""Seconds of per-language evaluation with the loss as the engine computes it (logits one vocabulary slice at a time,
running log-sum-exp) next to the plain way (full fp32 logits of a chunk, then cross-entropy), on the same windows of
the same model, with the summed NLL of both printed (they must agree to fp32 rounding; asserted to 1e-5 relative) and
each one's error against the same loss computed in fp64 on one window per language.

    python benchmarks/evaluation.py                  # Gemma 3 270M (cached in ~/.cache/mbs), 4 languages
    python benchmarks/evaluation.py --languages en,sw --chunk-tokens 1024
    python benchmarks/evaluation.py --tiny           # the tiny Gemma 3 test model, seconds
    python benchmarks/evaluation.py --device cuda
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mbs.evaluate import perplexity  # noqa: E402
from mbs.evaluate.perplexity import evaluate_languages  # noqa: E402
from mbs.models.adapter import Adapter  # noqa: E402


def full_logits_nll(adapter: Adapter, hidden: torch.Tensor, targets: torch.Tensor, vocab_slice: int = 0
                    ) -> torch.Tensor:
    """The plain loss: every logit of the chunk in fp32, then cross-entropy (a full log-softmax written out)."""
    return F.cross_entropy(adapter.logits(hidden), targets, reduction="sum").double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m", help="a conf/model option (default gemma3-270m)")
    parser.add_argument("--tiny", action="store_true", help="the tiny Gemma 3 test model instead")
    parser.add_argument("--languages", default="en,zh-Hans,hi,sw", help="comma-separated evaluation languages")
    parser.add_argument("--chunk-tokens", type=int, default=256, help="eval.chunk_tokens (default: the runs' 256)")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu (default) or cuda")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from mbs.config import register
    from mbs.models.loading import load_model
    from mbs.pipeline import prepare

    register()
    root = Path(__file__).resolve().parents[1]
    overrides = [f"model={'tiny-gemma3' if args.tiny else args.model}", "logger=none"]
    if args.tiny:
        os.environ.setdefault("MBS_CACHE", str(Path.home() / ".cache" / "mbs"))
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    prepared = prepare(cfg)
    windows = {lang: prepared.windows[lang] for lang in args.languages.split(",")}
    model = load_model(prepared.run.model, seed=0)
    tokens = sum(w.numel() - 1 for ws in windows.values() for w in ws)
    print(f"model {prepared.run.model.name} ({next(model.parameters()).dtype}), "
          f"vocabulary {Adapter(model).vocab_size}, "
          f"{len(windows)} languages, {tokens} predicted tokens, chunks of {args.chunk_tokens} tokens, "
          f"{torch.get_num_threads()} threads")

    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def run() -> tuple[float, dict]:
        synchronize()
        start = time.perf_counter()
        result = evaluate_languages(model, windows, args.device, prepared.run.eval.batch_size, args.chunk_tokens,
                                    progress=False)
        synchronize()
        return time.perf_counter() - start, result

    run()  # warm-up
    ours, ours_result = run()
    with mock.patch.object(perplexity, "summed_nll", full_logits_nll):
        plain, plain_result = run()
    print(f"{'language':<10} {'ppl (ours)':>12} {'ppl (plain)':>12} {'rel diff of summed NLL':>24}")
    for lang in windows:
        a, b = ours_result[lang], plain_result[lang]
        diff = abs(a.nll - b.nll) / abs(b.nll)
        print(f"{lang:<10} {a.perplexity:12.4f} {b.perplexity:12.4f} {diff:24.2e}")
        if diff > 1e-5:
            raise AssertionError(f"{lang}: summed NLL differs by {diff:.2e} (relative)")
    print(f"evaluation seconds: ours {ours:.2f}, plain {plain:.2f}, speed-up {plain / ours:.2f}x "
          f"({1000 * ours / tokens:.3f} vs {1000 * plain / tokens:.3f} ms per token)")

    adapter = Adapter(model)  # which of the two is closer to the loss computed in fp64 from the same logits
    print(f"first window of each language, NLL error relative to fp64: {'ours':>10} {'plain':>10}")
    with torch.no_grad():
        for lang, language_windows in windows.items():
            ids = language_windows[0][None].to(args.device)
            hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
            targets = ids[0, 1:]
            exact = F.cross_entropy(adapter.logits(hidden).double(), targets, reduction="sum")
            errors = [float((f(adapter, hidden, targets) - exact) / exact)
                      for f in (perplexity.summed_nll, full_logits_nll)]
            print(f"{lang:<57} {errors[0]:10.1e} {errors[1]:10.1e}")


if __name__ == "__main__":
    main()
