"""Zero-shot tasks: the generated UDHR task, the lm-eval bridge through `run.py`, and the report/record helpers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mbs.data.corpora import UDHRCorpus
from mbs.evaluate.udhr_mc import passages, write_tasks
from mbs.evaluate.zeroshot import TaskScore, compare

ROOT = Path(__file__).resolve().parents[1]
LANGS = ["en", "zh-Hans", "th", "hi", "yo"]


def _items(directory: Path, code: str) -> list[dict]:
    return [json.loads(line) for line in (directory / f"{code}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_udhr_items_use_evaluation_text_only_and_have_one_gold(tmp_path):
    corpus = UDHRCorpus(eval_from_article=25)  # articles 25-30 are evaluation text, 1-24 calibration
    directory = write_tasks(tmp_path, ["en", "zh-Hans"], corpus)
    assert write_tasks(tmp_path, ["en", "zh-Hans"], corpus) == directory  # same content, same files
    group = yaml.safe_load((directory / "_udhr_mc.yaml").read_text())
    assert group["task"] == ["udhr_mc_en", "udhr_mc_zh-Hans"]
    for code in LANGS:
        task = yaml.safe_load((directory / f"udhr_mc_{code}.yaml").read_text())
        delimiter = task["target_delimiter"]
        assert delimiter == ("" if code == "zh-Hans" else " ")
        evaluation = passages(corpus, code)
        calibration = [p.strip() for t in corpus.texts(code, "calibration") for p in t.split("\n")]
        items = _items(directory, code)
        assert len(items) >= 2 * len(evaluation)  # several cuts per passage, not one
        for item in items:
            choices = item["choices"]
            assert len(choices) == 4 and len(set(choices)) == 4 and 0 <= item["gold"] < 4
            texts = [item["context"] + delimiter + c for c in choices]
            gold = [i for i, t in enumerate(texts) if any(p.startswith(t) for p in evaluation)]
            assert gold == [item["gold"]]  # exactly one choice continues an evaluation passage: the gold
            assert any(p.startswith(texts[item["gold"]]) for p in evaluation if p not in calibration)
            assert all(any(c in p for p in evaluation) for c in choices)  # distractors: evaluation text too


def test_udhr_tasks_are_deterministic_and_keyed_by_content(tmp_path):
    a = write_tasks(tmp_path / "a", ["en"])
    b = write_tasks(tmp_path / "b", ["en"])
    assert a.name == b.name
    assert (a / "yo.jsonl").read_bytes() == (b / "yo.jsonl").read_bytes()
    c = write_tasks(tmp_path / "a", ["en"], UDHRCorpus(eval_from_article=20))  # other text → other files
    assert c != a and (a / "manifest.json").exists()


def test_paired_difference_and_its_stderr():
    dense = TaskScore(4, {"acc": (0.5, 0.29)}, {"acc": {("t", i): v for i, v in enumerate([1, 1, 0, 0])}})
    compressed = TaskScore(4, {"acc": (0.25, 0.25)}, {"acc": {("t", i): v for i, v in enumerate([1, 0, 0, 0])}})
    (row,) = compare({"t": dense}, {"t": compressed})
    assert row["difference"] == pytest.approx(-0.25)
    diffs = torch.tensor([0.0, -1.0, 0.0, 0.0], dtype=torch.float64)
    assert row["difference_stderr"] == pytest.approx(float(diffs.std() / 2))


def _loglik(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0, :-1].float(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def test_zeroshot_runs_through_run_py_on_a_task_defined_here(tmp_path, tokenizer):
    """A 4-item task written here: the harness's dense accuracy equals our own scoring of the same tiny model."""
    items = [{"q": "Everyone has the right to", "choices": ["life", "the the", "of and", "freedom of"], "gold": 3},
             {"q": "All human beings are born", "choices": ["free", "blue", "under", "right"], "gold": 0},
             {"q": "Kila mtu ana haki ya", "choices": ["kuishi", "and", "the", "uhuru"], "gold": 3},
             {"q": "No one shall be held in", "choices": ["slavery", "water", "right", "free"], "gold": 0}]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (tasks / "mbs_test_mc.yaml").write_text(yaml.safe_dump({
        "task": "mbs_test_mc", "dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
        "dataset_kwargs": {"data_files": {"test": str(tasks / "items.jsonl")}},
        "doc_to_text": "q", "doc_to_choice": "choices", "doc_to_target": "gold",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}))
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    proc = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={run_dir}", "progress=false", "model=tiny-llama",
                           "logger=none", "sampler.segments=20", "eval.languages=[en,sw]", "eval.tasks=[mbs_test_mc]",
                           f"eval.zeroshot.include_path={tasks}", "eval.zeroshot.batch_size=3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    rows = {r["metric"]: r for r in results["zeroshot"]["results"]}
    assert set(rows) == {"acc", "acc_norm"} and all(r["task"] == "mbs_test_mc" and r["n"] == 4 for r in rows.values())
    from mbs.models.tiny import tiny_model

    model = tiny_model("llama", {}, seed=0).eval()
    with torch.no_grad():
        scores = [[_loglik(model, tokenizer, i["q"], " " + c) for c in i["choices"]] for i in items]
    acc = sum(max(range(4), key=s.__getitem__) == i["gold"] for s, i in zip(scores, items)) / 4
    assert rows["acc"]["dense"] == pytest.approx(acc)
    for r in rows.values():
        assert 0 <= r["compressed"] <= 1 and r["difference"] == pytest.approx(r["compressed"] - r["dense"])
    assert "| mbs_test_mc | acc |" in proc.stdout
    assert {"zeroshot_dense_s", "zeroshot_compressed_s"} <= set(results["timings"])


def test_unknown_task_is_one_line_before_the_model_loads(tmp_path):
    """Every name of the paper preset is known to the installed harness; a bad one is named in one line."""
    paper = yaml.safe_load((ROOT / "conf" / "zeroshot" / "paper.yaml").read_text())["tasks"]
    proc = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={tmp_path}", "model=tiny-llama", "logger=none",
                           f"eval.tasks=[{','.join(paper)},xnli_xx,udhr_mc_en]"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mbs: error: eval.tasks: unknown lm-eval task(s) 'xnli_xx'")
    assert "close names:" in lines[0] and not (tmp_path / "results.json").exists()


def test_report_section_has_dense_compressed_and_difference_per_condition():
    from scipy import stats

    from mbs.record.frame import conditions
    from mbs.record.zeroshot_table import zeroshot_section
    from mbs.record.jobs import Job
    from mbs.record.results import RunResult

    def job(seed, compressor, compressed):
        row = {"task": "udhr_mc_en", "metric": "acc_norm", "n": 65, "dense": 0.8, "dense_stderr": 0.05,
               "compressed": compressed, "compressed_stderr": 0.06, "difference": compressed - 0.8,
               "difference_stderr": 0.04}
        res = {"experiment_id": f"{compressor}{seed}", "config": {"seed": seed}, "zeroshot": {"results": [row]}}
        return Job([f"compressor={compressor}", f"seed={seed}"], "done", results=RunResult.from_json(res))

    jobs = [job(0, "wanda", 0.6), job(0, "sparsegpt", 0.7), job(1, "sparsegpt", 0.74)]
    md, df = zeroshot_section(jobs, conditions(jobs))
    assert len(df) == 3 and "| task | metric | items | dense % | compressor=wanda | compressor=sparsegpt |" in md
    half = 100 * stats.t.ppf(0.975, 1) * stats.tstd([0.7, 0.74]) / 2 ** 0.5
    assert f"| udhr_mc_en | acc_norm | 65 | 80.0 ± 5.0 | 60.0 ± 6.0 (Δ -20.0 ± 4.0) | 72.0 ± {half:.1f} (Δ -8.0 ± {half:.1f}) |" in md
    assert zeroshot_section([Job(["compressor=wanda"], "done", results=RunResult.from_json({"config": {}}))], {0: "x"}) is None


def test_continuation_scorer_matches_hflm_on_every_architecture(tokenizer):
    """Our log-likelihoods (continuation positions only, sliced log-sum-exp) equal HFLM's full log-softmax ones."""
    from lm_eval.models.huggingface import HFLM

    from mbs.evaluate.zeroshot import _scorer
    from mbs.models.tiny import tiny_model

    pairs = [("Everyone has the right to", " life and liberty"), ("Kila mtu", " ana haki"), ("人人有权", "享有"),
             ("No one shall be held in slavery or servitude; slavery and the slave trade shall be prohibited in all "
              "their forms. Everyone", " has"), ("All", " human beings are born free and equal in dignity")]
    for arch in ("llama", "gemma3", "bloom"):  # gemma3: a sliding window shorter than the long context
        model = tiny_model(arch, {}).eval()
        reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3, softmax_dtype=torch.float32)
        ours = _scorer(HFLM)(pretrained=model, tokenizer=tokenizer, batch_size=2)
        requests = [((c, k), *reference._encode_pair(c, k)) for c, k in pairs]
        with torch.no_grad():
            expected = reference._loglikelihood_tokens(requests, disable_tqdm=True)
            got = ours._loglikelihood_tokens(requests, disable_tqdm=True)
        assert [g for _, g in got] == [g for _, g in expected]
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=1e-4)


def _flip_gold(path: Path) -> None:
    items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    items[0]["gold"] = (items[0]["gold"] + 1) % 4  # same size: only the checksum can tell
    path.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")


@pytest.mark.parametrize("damage", ["flipped gold", "truncated", "planted module"])
def test_damaged_task_files_are_detected_and_rebuilt(tmp_path, damage, caplog):
    directory = write_tasks(tmp_path, ["en"])
    original = {p.name: p.read_bytes() for p in directory.iterdir()}
    if damage == "flipped gold":
        _flip_gold(directory / "en.jsonl")
    elif damage == "truncated":
        with open(directory / "udhr_mc_en.yaml", "r+b") as f:
            f.truncate(10)
    else:  # the harness imports a module a task YAML names with !function
        (directory / "utils.py").write_text("import os; os.environ['PLANTED'] = '1'\n")
        (directory / "udhr_mc_en.yaml").write_text("task: udhr_mc_en\nprocess_docs: !function utils.run\n")
    assert write_tasks(tmp_path, ["en"]) == directory
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == original
    assert "rebuilding it" in caplog.text


def test_the_harness_reads_task_files_verified_right_before_it_runs(tmp_path, monkeypatch):
    """Files changed between the check before loading and the evaluation (minutes later) are rebuilt first."""
    import lm_eval

    from mbs.evaluate import zeroshot
    from mbs.evaluate.zeroshot import ZeroShotConfig, prepare_zeroshot

    prepared = prepare_zeroshot(["udhr_mc_en"], ZeroShotConfig(), tmp_path, ["en"])
    directory = write_tasks(tmp_path, ["en"])
    original = (directory / "en.jsonl").read_bytes()
    _flip_gold(directory / "en.jsonl")
    seen = []

    def read_instead(**kwargs):
        seen.append((directory / "en.jsonl").read_bytes())
        raise RuntimeError("stop")

    monkeypatch.setattr(zeroshot, "_scorer", lambda HFLM: lambda **kwargs: None)
    monkeypatch.setattr(lm_eval, "simple_evaluate", read_instead)
    with pytest.raises(RuntimeError, match="stop"):
        prepared.evaluate(None, None, progress=False)
    assert seen == [original]
