"""Zero-shot accuracy through lm-evaluation-harness (the optional extra ``pip install -e ".[eval]"``), on the
in-memory dense and compressed models (its HFLM wrapper takes a model object and a tokenizer): nothing is saved
or reloaded between compression and evaluation.

Task names are checked against the harness's TaskManager before the model loads, including our generated offline
tasks (``udhr_mc``, mbs/evaluate/udhr_mc.py) and a user's own task directory (``eval.zeroshot.include_path``).
lm-eval is imported only when ``eval.tasks`` is not empty.
"""
from __future__ import annotations

import difflib
import logging
import math
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class ZeroShotConfig:
    """How ``eval.tasks`` are run (the harness's own knobs)."""

    limit: Optional[float] = None  # items per task: None = all, >= 1 a count, < 1 a fraction (quick looks only)
    batch_size: int = 8  # (context, choice) pairs per forward
    num_fewshot: Optional[int] = None  # None: each task's own default (0 for the tasks shipped here)
    include_path: Optional[str] = None  # a directory of your own harness task YAMLs

    def __post_init__(self) -> None:
        if self.limit is not None and not self.limit > 0:
            raise ValueError(f"eval.zeroshot.limit={self.limit} must be > 0 (a count, or a fraction below 1) or null")
        if self.limit is not None and self.limit >= 1 and self.limit != int(self.limit):
            raise ValueError(f"eval.zeroshot.limit={self.limit} is neither a count (a whole number >= 1) nor a "
                             f"fraction below 1; the harness would silently use {int(self.limit)}")
        if self.batch_size < 1:
            raise ValueError(f"eval.zeroshot.batch_size={self.batch_size} must be >= 1")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"eval.zeroshot.num_fewshot={self.num_fewshot} must be >= 0 or null")
        if self.include_path is not None and not Path(self.include_path).expanduser().is_dir():
            raise ValueError(f"eval.zeroshot.include_path={self.include_path!r} is not a directory")


def _harness():
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ValueError('eval.tasks needs lm-evaluation-harness: pip install -e ".[eval]"') from err
    import lm_eval.tasks

    return lm_eval.tasks


def harness_version() -> str:
    from importlib.metadata import version

    return f"lm_eval {version('lm_eval')}"


@contextmanager
def _quiet(progress: bool, level: int = logging.WARNING) -> Iterator[None]:
    """The harness at WARNING (it logs at INFO per task and request), and without progress bars unless asked."""
    logger = logging.getLogger("lm_eval")
    before, bars = logger.level, os.environ.get("TQDM_DISABLE")
    logger.setLevel(level)
    if not progress:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        logger.setLevel(before)
        if bars is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = bars


def _self_contained(name: str, index: dict) -> bool:
    """A name whose group members (recursively) are all in ``index``."""
    entry = index.get(name)
    if entry is None:
        return False
    members = (entry.cfg or {}).get("task", []) if entry.kind.name == "GROUP" else []
    return all(_self_contained(m, index) if isinstance(m, str) else "task" in m for m in members)


def task_manager(tasks: list[str], include_paths: list[Path]):
    """A TaskManager that knows every name in ``tasks``, or a one-line ValueError naming the unknown ones (with
    the closest known names). Only our own directories are indexed when they hold every task asked for (a second
    or less); otherwise the harness's ~15k built-in tasks too (10-15 s on a small CPU)."""
    harness = _harness()
    with _quiet(True, logging.ERROR):  # the index warns about every overridden or skipped file
        if include_paths:
            local = harness.TaskManager(include_path=[str(p) for p in include_paths], include_defaults=False)
            if all(_self_contained(t, local._index) for t in tasks):
                return local
        manager = harness.TaskManager(include_path=[str(p) for p in include_paths] or None)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hints = sorted({m for t in unknown for m in difflib.get_close_matches(t, manager.all_tasks, n=4, cutoff=0.6)})
        raise ValueError(f"eval.tasks: unknown lm-eval task(s) {', '.join(map(repr, unknown))}"
                         + (f"; close names: {', '.join(hints)}" if hints else "")
                         + f" ({len(known)} tasks known; list them with `lm-eval ls tasks`)")
    return manager


@contextmanager
def _rng_kept() -> Iterator[None]:
    """The harness seeds the global RNGs; put them back so the run's own random stream is what it was."""
    import numpy as np

    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])


@dataclass
class TaskScore:
    n: int
    metrics: dict[str, tuple[float, float | None]]  # metric → (value, stderr)
    samples: dict[str, dict[tuple[str, int], float]] = field(default_factory=dict)  # metric → (task, doc) → value


def _float(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def scores(output: dict[str, Any]) -> dict[str, TaskScore]:
    """Per task and group: metrics with stderrs, the number of items, and per-item values (for paired differences)."""
    samples: dict[str, dict[str, dict[tuple[str, int], float]]] = {}
    for task, rows in (output.get("samples") or {}).items():
        for row in rows:
            for key, value in row.items():
                if key in output["results"][task] or f"{key},none" in output["results"][task]:
                    samples.setdefault(task, {}).setdefault(key, {})[(task, row["doc_id"])] = float(value)
    members = output.get("group_subtasks", {})

    def leaves(name: str) -> list[str]:
        return [leaf for child in members[name] for leaf in leaves(child)] if members.get(name) else [name]

    table = {}
    for name, entry in {**output.get("results", {}), **output.get("groups", {})}.items():
        metrics = {}
        for key, value in entry.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            if _float(value) is None:
                continue
            label = metric if filt == "none" else f"{metric},{filt}"
            metrics[label] = (_float(value), _float(entry.get(f"{metric}_stderr,{filt}")))
        n = sum(int(output.get("n-samples", {}).get(t, {}).get("effective", 0)) for t in leaves(name))
        merged: dict[str, dict[tuple[str, int], float]] = {}
        for leaf in leaves(name):
            for metric, values in samples.get(leaf, {}).items():
                merged.setdefault(metric, {}).update(values)
        table[name] = TaskScore(n, metrics, merged)
    return table


def _scorer(HFLM):
    """HFLM whose log-likelihoods come from the final hidden states at the continuation positions only, through
    the sliced fp32 log-sum-exp of the perplexity evaluation: HFLM forms and log-softmaxes the logits of every
    position (for Gemma's 262k vocabulary, gigabytes per batch), of which a multiple-choice item needs the few
    continuation tokens. Same inputs (the harness's tokenization, left truncation, right padding)."""
    from mbs.evaluate.perplexity import token_nll
    from mbs.models.adapter import Adapter

    class Scorer(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            if self.backend != "causal":
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            adapter = Adapter(self.model)
            seqs = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in requests]
            order = sorted(range(len(requests)), key=lambda i: -len(seqs[i]))  # similar lengths share a batch
            out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
            size = int(override_bs or self.batch_size)  # an int: ZeroShotConfig.batch_size
            from tqdm import tqdm

            bar = tqdm(total=len(requests), desc="zero-shot log-likelihoods", leave=False,
                       **({"disable": True} if disable_tqdm else {}))  # else TQDM_DISABLE decides (_quiet)
            for start in range(0, len(order), size):
                batch = order[start:start + size]
                width = max(len(seqs[i]) - 1 for i in batch)
                inputs = torch.full((len(batch), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
                rows, cols, targets, spans = [], [], [], []
                for r, i in enumerate(batch):
                    seq, n_cont = seqs[i], len(requests[i][2])
                    inputs[r, : len(seq) - 1] = torch.tensor(seq[:-1])
                    spans.append((len(targets), len(targets) + n_cont))
                    for pos in range(len(seq) - 1 - n_cont, len(seq) - 1):  # position pos predicts seq[pos + 1]
                        rows.append(r), cols.append(pos), targets.append(seq[pos + 1])
                hidden = self.model.base_model(input_ids=inputs.to(self.device), use_cache=False).last_hidden_state
                nll, greedy = token_nll(adapter, hidden[rows, cols], torch.tensor(targets, device=hidden.device))
                for i, (a, b) in zip(batch, spans):
                    out[i] = (-float(nll[a:b].double().sum()), bool(greedy[a:b].all()))
                bar.update(len(batch))
            bar.close()
            return out

    return Scorer


@dataclass
class ZeroShot:
    """The checked task list and its TaskManager, made before the model loads; ``evaluate`` runs on a model."""

    tasks: list[str]
    config: ZeroShotConfig
    manager: Any
    seed: int = 0
    verify: Callable[[], Any] | None = None  # checks (and rebuilds) our task files; run right before the harness reads

    def evaluate(self, model: nn.Module, tokenizer, add_bos: bool | None = None, progress: bool = True
                 ) -> dict[str, TaskScore]:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        if self.verify is not None:  # minutes may have passed since prepare: the harness reads the checked files
            self.verify()
        with _quiet(progress), _rng_kept(), torch.no_grad():
            # fp32 log-likelihoods of the continuation tokens only; the model stays where it is (HFLM takes its device)
            lm = _scorer(HFLM)(pretrained=model, tokenizer=tokenizer, batch_size=self.config.batch_size,
                      add_bos_token=add_bos, softmax_dtype=torch.float32)
            output = simple_evaluate(model=lm, tasks=list(self.tasks), num_fewshot=self.config.num_fewshot,
                                     limit=self.config.limit, task_manager=self.manager, log_samples=True,
                                     random_seed=self.seed, numpy_random_seed=self.seed,
                                     torch_random_seed=self.seed, fewshot_random_seed=self.seed)
        return scores(output)


def prepare_zeroshot(tasks: list[str], config: ZeroShotConfig, cache: Path, languages: list[str], udhr=None,
                     seed: int = 0) -> ZeroShot | None:
    """Generate our offline task files and check the names (a ValueError names a bad one); None without tasks."""
    if not tasks:
        return None
    from mbs.evaluate.task_data import check_task_data
    from mbs.evaluate.udhr_mc import write_tasks

    paths = [write_tasks(cache, languages, udhr)]
    if config.include_path:
        paths.append(Path(config.include_path).expanduser().resolve())
    manager = task_manager(list(tasks), paths)
    check_task_data(manager, list(tasks))  # a hub dataset that cannot be had fails here, not after the dense eval
    return ZeroShot(list(tasks), config, manager, seed, verify=lambda: write_tasks(cache, languages, udhr))


def _paired_stderr(dense: dict, compressed: dict) -> float | None:
    keys = sorted(dense.keys() & compressed.keys())
    if len(keys) < 2:
        return None
    d = torch.tensor([compressed[k] - dense[k] for k in keys], dtype=torch.float64)
    return float(d.std(unbiased=True) / math.sqrt(len(keys)))


def compare(dense: dict[str, TaskScore], compressed: dict[str, TaskScore]) -> list[dict[str, Any]]:
    """One row per task (and group) and metric: dense and compressed value ± stderr, and the difference with the
    stderr of the paired difference (the same items were scored twice, so it is far smaller than the two combined)."""
    rows = []
    for task, d in dense.items():
        c = compressed[task]
        for metric, (dv, ds) in d.metrics.items():
            cv, cs = c.metrics.get(metric, (math.nan, None))
            rows.append({"task": task, "metric": metric, "n": d.n, "dense": dv, "dense_stderr": ds,
                         "compressed": cv, "compressed_stderr": cs, "difference": cv - dv,
                         "difference_stderr": _paired_stderr(d.samples.get(metric, {}),
                                                             c.samples.get(metric, {}))})
    return rows


def _pm(value: float, stderr: float | None, scale: float = 100.0) -> str:
    return f"{scale * value:.1f}" + ("" if stderr is None else f" ± {scale * stderr:.1f}")


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """Accuracy in % ± stderr (the harness's), difference ± paired stderr."""
    lines = ["| task | metric | items | dense % | compressed % | difference (pts) |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {r['n']} | {_pm(r['dense'], r['dense_stderr'])} | "
                     f"{_pm(r['compressed'], r['compressed_stderr'])} | "
                     f"{_pm(r['difference'], r['difference_stderr'])} |")
    return "\n".join(lines) + "\n"
