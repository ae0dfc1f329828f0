"""Which similarity statistic tells languages apart (``analysis.statistic``): for every statistic and decoder layer,
each language's activation vector from one text sample is compared with every language's vector from a disjoint
sample (the UDHR's calibration articles vs its evaluation articles: different text, the same language), on the dense
model. Printed per statistic and layer: retrieval accuracy (share of languages, both directions, whose own other
sample is the most similar of all) and the standardised gap ((mean same-language cosine − mean other-language
cosine) / std of the other-language cosines), then the mean over layers.

    python benchmarks/similarity_separability.py                 # Gemma 3 270M, the 20 evaluated languages
    python benchmarks/similarity_separability.py --windows 2 --tiny
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mbs.analyze.similarity import STATISTICS, language_vectors, separability  # noqa: E402
from mbs.data.calibration import CalibrationSet, _prefix, eval_windows, language_stream  # noqa: E402


def disjoint_samples(tokenizer, corpus, languages: list[str], seqlen: int, prepend_bos: bool, windows: int
                     ) -> tuple[CalibrationSet, CalibrationSet]:
    """Up to ``windows`` full, non-overlapping windows of each language's calibration text, and of its evaluation
    text; languages with no full window in either split are left out (named)."""
    prefix = _prefix(tokenizer, prepend_bos)
    samples: dict[str, dict[str, torch.Tensor]] = {"calibration": {}, "evaluation": {}}
    for language in languages:
        cut = {}
        for split in samples:
            stream = language_stream(tokenizer, corpus, language, split)
            full = [w for w in eval_windows(stream, seqlen, prefix, windows) if w.numel() == seqlen]
            if full:
                cut[split] = torch.stack(full)
        if len(cut) == 2:
            for split, t in cut.items():
                samples[split][language] = t
        else:
            print(f"left out {language}: no full window of {seqlen} tokens in both splits")
    return CalibrationSet(samples["calibration"]), CalibrationSet(samples["evaluation"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m", help="a conf/model option (default gemma3-270m)")
    parser.add_argument("--tiny", action="store_true", help="the tiny Gemma 3 test model instead")
    parser.add_argument("--windows", type=int, default=4, help="windows per language and sample (default 4)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from mbs.config import register
    from mbs.models.loading import load_model
    from mbs.models.adapter import Adapter
    from mbs.pipeline import prepare

    register()
    root = Path(__file__).resolve().parents[1]
    overrides = [f"model={'tiny-gemma3' if args.tiny else args.model}", "logger=none", "analysis.layers=[]",
                 f"engine.device={args.device}"]
    if args.tiny:
        os.environ.setdefault("MBS_CACHE", str(Path.home() / ".cache" / "mbs"))
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    prepared = prepare(cfg)
    run = prepared.run
    first, second = disjoint_samples(prepared.tokenizer, run.data, list(run.eval.languages), run.model.seqlen,
                                     run.model.prepend_bos, args.windows)
    model = load_model(run.model, seed=0)
    layers = list(range(len(Adapter(model).layers)))
    print(f"model {run.model.name}; {len(first.segments)} languages; {args.windows} windows of {run.model.seqlen} "
          f"tokens per language and sample (calibration vs evaluation articles)")
    raw = {}
    for source in dict.fromkeys(s.source for s in STATISTICS.values()):
        raw[source] = [language_vectors(model, sample, layers, run.engine, source) for sample in (first, second)]
    header = f"{'statistic':<24} {'layer':>5} {'retrieval':>9} {'gap':>6} {'same':>7} {'other':>7}"
    summary = []
    for name, statistic in STATISTICS.items():
        print("\n" + header)
        a, b = raw[statistic.source]
        figures = [separability(a[i], b[i], name) for i in layers]
        for i, f in zip(layers, figures):
            print(f"{name:<24} {i:>5} {f.retrieval:>9.3f} {f.gap:>6.2f} {f.same:>7.3f} {f.other:>7.3f}")
        summary.append((name, figures))
    print("\nper statistic: layer 0 | last layer | mean over layers (retrieval accuracy, standardised gap)")
    for name, figures in summary:
        mean_r, mean_g = np.mean([f.retrieval for f in figures]), np.mean([f.gap for f in figures])
        print(f"{name:<24} {figures[0].retrieval:.3f} {figures[0].gap:5.2f} | {figures[-1].retrieval:.3f} "
              f"{figures[-1].gap:5.2f} | {mean_r:.3f} {mean_g:5.2f}")


if __name__ == "__main__":
    main()
