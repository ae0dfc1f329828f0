"""An offline multilingual zero-shot task on the embedded UDHR: multiple-choice continuation, one harness task per
language (``udhr_mc_<code>``) and a group (``udhr_mc``) over the run's evaluation languages.

Only *evaluation* articles are used (``UDHRCorpus.texts(code, "evaluation")``), so no item was seen in calibration.
Each paragraph of an evaluation article is a passage; it is cut into segments of about ``SEGMENT_CHARS`` English
characters' worth of text (scaled by the language's length relative to English on the same parallel articles, so a
segment carries about the same content in every language), at word boundaries (in Thai-family scripts the spaces
between phrases), or at character boundaries in Chinese and Japanese, which have no spaces at all (never before a
punctuation mark or a combining mark). Every cut of every passage
is one item: the passage up to the cut is the context, the next segment the gold continuation, and three distractors
are continuation segments (never first segments) of *other* passages of the same language, drawn with a seeded RNG.
More items than one per paragraph keep the per-language standard error small; items from one passage share context,
so the binomial standard error slightly understates the true one.

Files (JSONL data + harness YAML) are generated into ``<cache>/zeroshot/udhr_mc-<content hash>``: a change to the
text, the segmentation or the language list gives a new directory. It is a cache entry (mbs/cache.py): checksummed,
verified on every use and rebuilt when a file changed, went missing or was added (the harness executes what a task
YAML names, e.g. ``!function`` modules beside it), and verified again right before each evaluation.
"""
from __future__ import annotations

import hashlib
import json
import random
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from mbs.cache import Cache
from mbs.data.corpora import UDHRCorpus
from mbs.data.languages import get_language

VERSION = 1  # bump when the items change for the same text
GROUP = "udhr_mc"
SEGMENT_CHARS = 50  # English characters per segment (~8-9 words); other languages scaled by their parallel length
CHOICES = 4
SEED = 0
# Cut between characters: scripts without spaces. (Thai, Lao, Khmer put spaces between phrases, and a character cut
# there could split a syllable, e.g. after a leading vowel: they are cut at those spaces.)
UNSPACED_SCRIPTS = frozenset({"Hans", "Hant", "Jpan"})


def task_name(code: str) -> str:
    return f"{GROUP}_{code}"


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    gold: int
    passage: int  # index of the passage (paragraph) the item comes from


def passages(corpus: UDHRCorpus, code: str) -> list[str]:
    """The paragraphs (and list items) of the language's evaluation articles, in order."""
    return [p.strip() for text in corpus.texts(code, "evaluation") for p in text.split("\n") if p.strip()]


def _boundaries(text: str, spaced: bool) -> list[int]:
    """Positions where a passage may be cut: before a word (spaced scripts), or between two characters neither of
    which is a space, the second not a combining mark or punctuation (scripts without spaces)."""
    if spaced:
        return [i for i in range(1, len(text)) if text[i - 1].isspace() and not text[i].isspace()]
    return [i for i in range(1, len(text))
            if not text[i - 1].isspace() and not text[i].isspace()
            and unicodedata.category(text[i])[0] not in "MP"]


def segments(text: str, target_chars: float, spaced: bool) -> list[str]:
    """Cut a passage into max(2, round(len / target_chars)) pieces at the allowed boundaries nearest to equal
    fractions of its length; [] when it cannot be cut in two."""
    candidates = _boundaries(text, spaced)
    if not candidates:
        return []
    k = max(2, round(len(text) / target_chars))
    cuts: list[int] = []
    for j in range(1, k):
        best = min(candidates, key=lambda c: (abs(c - j * len(text) / k), c))
        if not cuts or best > cuts[-1]:
            cuts.append(best)
    bounds = [0, *cuts, len(text)]
    return [text[a:b].strip() for a, b in zip(bounds, bounds[1:])]


def build_items(paragraphs: list[str], target_chars: float, spaced: bool, seed: str) -> list[Item]:
    """Every cut of every passage as an item with 3 distractors from other passages' continuation segments."""
    pieces = [segments(p, target_chars, spaced) for p in paragraphs]
    pool = [(i, s) for i, segs in enumerate(pieces) for s in segs[1:]]
    rng = random.Random(seed)
    joiner = " " if spaced else ""
    items = []
    for i, segs in enumerate(pieces):
        for j in range(1, len(segs)):
            gold = segs[j]
            others = [s for p, s in pool if p != i and s != gold]
            distinct = list(dict.fromkeys(others))
            if len(distinct) < CHOICES - 1:
                continue
            choices = [gold, *rng.sample(distinct, CHOICES - 1)]
            rng.shuffle(choices)
            items.append(Item(joiner.join(segs[:j]), tuple(choices), choices.index(gold), i))
    return items


def language_items(corpus: UDHRCorpus, code: str, english_chars: int) -> list[Item]:
    paragraphs = passages(corpus, code)
    scale = sum(map(len, paragraphs)) / english_chars if english_chars else 1.0
    spaced = get_language(code).script not in UNSPACED_SCRIPTS
    return build_items(paragraphs, SEGMENT_CHARS * scale, spaced, f"{SEED}:{code}")


def _task_yaml(code: str, data_file: Path) -> str:
    delimiter = " " if get_language(code).script not in UNSPACED_SCRIPTS else ""
    config = {
        "task": task_name(code),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",  # column names
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": delimiter,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": VERSION, "language": code},
    }
    return json.dumps(config, ensure_ascii=False, indent=1) + "\n"  # JSON is YAML


def _group_yaml(codes: list[str]) -> str:
    config = {"group": GROUP, "task": [task_name(c) for c in codes],
              "aggregate_metric_list": [{"metric": m, "aggregation": "mean", "weight_by_size": True}
                                        for m in ("acc", "acc_norm")],
              "metadata": {"version": VERSION}}
    return json.dumps(config, ensure_ascii=False, indent=1) + "\n"


def write_tasks(cache: Path, group_languages: list[str], corpus: UDHRCorpus | None = None) -> Path:
    """Generate the task files for every UDHR language of the code table (the group covers ``group_languages``
    that the UDHR has) and return their directory: a verified cache entry, reused when its content is unchanged and
    its files are the ones written, rebuilt otherwise."""
    corpus = corpus or UDHRCorpus()
    codes = corpus.languages()
    english = sum(map(len, passages(corpus, "en"))) if "en" in codes else 0
    data = {code: "".join(json.dumps({"context": it.context, "choices": list(it.choices), "gold": it.gold},
                                     ensure_ascii=False) + "\n" for it in language_items(corpus, code, english))
            for code in codes}
    data = {code: text for code, text in data.items() if text}
    group = [c for c in group_languages if c in data]
    digest = hashlib.sha256(json.dumps([VERSION, data, group], ensure_ascii=False).encode()).hexdigest()[:16]
    name = f"zeroshot/{GROUP}-{digest}"
    manifest = {"version": VERSION, "group": group, "items": {c: t.count("\n") for c, t in data.items()}}

    def build(tmp: Path) -> None:
        # the YAML names the data file where the entry ends up: after the rename, or here when the cache is unwritable
        final = tmp if tmp.name == Path(name).name else Path(cache) / name
        _write_files(tmp, final, data, group, manifest)

    return Cache(Path(cache)).entry(name, build, what=f"the {GROUP} zero-shot task files")


def _write_files(tmp: Path, directory: Path, data: dict[str, str], group: list[str], manifest: dict) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    for code, text in data.items():
        (tmp / f"{code}.jsonl").write_text(text, encoding="utf-8")
        # the YAML names the data file at its final place, after the rename
        (tmp / f"{task_name(code)}.yaml").write_text(_task_yaml(code, directory / f"{code}.jsonl"), encoding="utf-8")
    if group:
        (tmp / f"_{GROUP}.yaml").write_text(_group_yaml(group), encoding="utf-8")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
