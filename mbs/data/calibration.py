"""Token windows: seeded random calibration segments and non-overlapping evaluation windows, per language."""
from __future__ import annotations

import json
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mbs.data.cache import TokenCache, stream_key
from mbs.data.corpora import Corpus

ALL_LANGUAGES = "all"  # the label of a batch, or a statistic, that mixes languages
REPEAT_WARNING = 4.0  # a language whose segments draw more than this many tokens per token of its text is named
REPEAT_LIMIT = 64.0  # ... and past this many a run is refused (calibration_max_repeats raises it): on the UDHR with
# the default model, sampler=english and the monolingual jobs of sweeps/calibration_mixtures draw up to x30 (zh-Hans:
# 128 x 255 tokens from 1,069); an extra zero in sampler.segments, x300
MIN_SEQLEN = 8


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """The documents of one language and split as one 1-D stream of token ids (no special tokens)."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def language_stream(tokenizer, corpus: Corpus, language: str, split: str,
                    cache: TokenCache | None = None) -> torch.Tensor:
    """The token stream of one language and split, from the cache when it holds one (no reading, no tokenizing)."""
    if cache is None:
        return token_stream(tokenizer, corpus.texts(language, split))
    return cache.stream(stream_key(tokenizer, corpus, language, split),
                        lambda: token_stream(tokenizer, corpus.texts(language, split)),
                        {"corpus": corpus.name, "language": language, "split": split})


def _prefix(tokenizer, prepend_bos: bool) -> list[int]:
    if not prepend_bos:
        return []
    if tokenizer.bos_token_id is None:
        raise ValueError("model.prepend_bos=true but the tokenizer has no BOS token")
    return [tokenizer.bos_token_id]


def language_seed(seed: int, language: str) -> int:
    """A per-language seed: adding or removing a language does not move the others' windows."""
    return (seed * 1_000_003 + zlib.crc32(language.encode())) % (2**63)


def sample_segments(stream: torch.Tensor, count: int, seqlen: int, seed: int, prefix: list[int]) -> torch.Tensor:
    """``count`` windows of ``seqlen`` tokens (prefix included) starting at seeded random offsets of the stream."""
    body = seqlen - len(prefix)
    if count == 0:
        return torch.empty(0, seqlen, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - body + 1, (count,), generator=generator)
    windows = torch.stack([stream[s : s + body] for s in starts.tolist()])
    if prefix:
        windows = torch.cat([torch.tensor(prefix).expand(count, -1), windows], dim=1)
    return windows


def eval_windows(stream: torch.Tensor, seqlen: int, prefix: list[int], max_windows: int | None = None) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows; the last one may be shorter (kept, so every token is scored once)."""
    body = seqlen - len(prefix)
    chunks = [stream[i : i + body] for i in range(0, stream.numel(), body)]
    chunks = [c for c in chunks if c.numel() + len(prefix) >= 2]
    if max_windows:
        chunks = chunks[:max_windows]
    return [torch.cat([torch.tensor(prefix, dtype=torch.long), c]) for c in chunks]


def window_bytes(tokenizer, windows: Mapping[str, Sequence[torch.Tensor]], prepend_bos: bool
                 ) -> dict[str, list[int]]:
    """Per language and window, the UTF-8 bytes of the text that the window's *predicted* tokens stand for: all but
    its first token (the BOS prefix, ``prepend_bos``, or without one the first text token, which is context only).
    The denominator of bits per byte (:attr:`mbs.evaluate.perplexity.LanguageLoss.bpb`).

    Tokens are counted by :func:`token_bytes`, so a character that byte tokens split across two windows counts its
    bytes where its tokens are, and the windows covering a text add up to its bytes exactly (tested; a Metaspace
    tokenizer's added leading space counts one byte more). A tokenizer that function cannot read is counted by
    decoding (:func:`decoded_window_bytes`)."""
    try:
        table = tokenizer._mbs_token_bytes  # read once per tokenizer object
    except AttributeError:
        table = token_bytes(tokenizer)
        try:
            tokenizer._mbs_token_bytes = table
        except AttributeError:
            pass
    if table is None or any(int(w.max()) >= table.numel() for ws in windows.values() for w in ws if w.numel()):
        return decoded_window_bytes(tokenizer, windows, prepend_bos)
    return {language: [int(table[w[1:]].sum()) for w in language_windows]
            for language, language_windows in windows.items()}


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_COUNTED_DECODERS = {"ByteLevel", "ByteFallback", "Metaspace", "Replace", "Fuse", "Strip"}


def token_bytes(tokenizer) -> torch.Tensor | None:
    """The UTF-8 bytes each token id stands for, read from a fast tokenizer's own byte encoding, never by decoding
    a token alone (a byte token decodes to a replacement character, and some decoders drop a leading space):
    byte-level BPE (GPT-2's byte alphabet: BLOOM, Llama 3, Qwen, mGPT) one byte per character of the token; a
    byte-fallback token ``<0xNN>`` (SentencePiece: Gemma, Llama 2, Mixtral) one byte; any other token its text
    after the decoder's replacements (``▁`` → space) in UTF-8; an added token its content. None when the decoder
    does anything else (a slow tokenizer, WordPiece, a regex replacement): then only decoding can tell."""
    from tokenizers import pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return None
    spec = json.loads(decoder.__getstate__())
    parts = spec.get("decoders", []) if spec.get("type") == "Sequence" else [spec]
    kinds = {p.get("type") for p in parts}
    if not kinds <= _COUNTED_DECODERS or any("String" not in p["pattern"] for p in parts if p["type"] == "Replace"):
        return None
    replace = [(p["pattern"]["String"], p["content"]) for p in parts if p["type"] == "Replace"]
    replace += [(p.get("replacement", "\u2581"), " ") for p in parts if p["type"] == "Metaspace"]
    alphabet = set(pre_tokenizers.ByteLevel.alphabet()) if "ByteLevel" in kinds else set()
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    counts = []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if "ByteFallback" in kinds and token and _BYTE_TOKEN.fullmatch(token):  # also when it is an added token
            counts.append(1)
        elif i in added:
            counts.append(len(added[i].encode("utf-8")))
        elif token is None:
            counts.append(0)
        elif alphabet and all(c in alphabet for c in token):
            counts.append(len(token))
        else:
            for old, new in replace:
                token = token.replace(old, new)
            counts.append(len(token.encode("utf-8")))
    return torch.tensor(counts, dtype=torch.long)


CONTEXT_TOKENS = 8  # decoded before each span and subtracted: more than the 4 byte tokens a character can span


def decoded_window_bytes(tokenizer, windows: Mapping[str, Sequence[torch.Tensor]], prepend_bos: bool
                         ) -> dict[str, list[int]]:
    """:func:`window_bytes` by decoding, for a tokenizer :func:`token_bytes` cannot read. A span is not decoded alone
    (a leading space may be dropped, a character cut at its edge decodes to a replacement character): each window
    counts ``len(decode(context + span)) - len(decode(context))``, the context being the ``CONTEXT_TOKENS`` text
    tokens before the span (a language's windows are consecutive cuts of one stream, :func:`eval_windows`). A
    character cut by a window edge then counts in the window where it starts, and the windows covering a text add
    up to its bytes, except where byte-fallback tokens run longer than the context (their decoder replaces a whole
    run that does not decode)."""
    skip = 1 if prepend_bos else 0
    out = {}
    for language, language_windows in windows.items():
        stream = [t for w in language_windows for t in w[skip:].tolist()]
        spans, start = [], 0
        for w in language_windows:
            end = start + w.numel() - skip
            first = start + 1 - skip  # stream index of the window's first predicted token, w[1]
            spans.append((max(0, first - CONTEXT_TOKENS), first, end))
            start = end
        texts = tokenizer.batch_decode([stream[c:e] for c, _, e in spans] + [stream[c:f] for c, f, _ in spans],
                                       skip_special_tokens=False, clean_up_tokenization_spaces=False)
        n = len(spans)
        out[language] = [len(texts[i].encode("utf-8")) - len(texts[n + i].encode("utf-8")) for i in range(n)]
    return out


@dataclass
class CalibrationSet:
    """Calibration segments per language, each a [n, seqlen] tensor; the engine batches within a language when it
    keeps statistics per language, and fills every batch across languages otherwise."""

    segments: dict[str, torch.Tensor]

    @property
    def total(self) -> int:
        return sum(t.shape[0] for t in self.segments.values())

    def batches(self, batch_size: int, by_language: bool = True) -> list[tuple[str, torch.Tensor]]:
        """(language, [b, seqlen]) batches; with ``by_language=False`` every batch is full, segments of consecutive
        languages sharing one (labelled ALL_LANGUAGES): fewer, larger forwards when nothing is kept per language."""
        if by_language:
            return [(lang, t[i : i + batch_size]) for lang, t in self.segments.items() if t.numel()
                    for i in range(0, t.shape[0], batch_size)]
        stacked = torch.cat([t for t in self.segments.values() if t.numel()])
        return [(ALL_LANGUAGES, stacked[i : i + batch_size]) for i in range(0, stacked.shape[0], batch_size)]

    def to_dataset(self):
        """A ``datasets.Dataset`` with one row per segment (``input_ids``, ``attention_mask`` of ones, ``language``),
        in language order: the same mixture as calibration data for another toolkit, e.g. llm-compressor's
        ``oneshot(model, dataset=mixture.to_dataset(), num_calibration_samples=len(...))``."""
        from datasets import Dataset

        rows = [(lang, seg.tolist()) for lang, t in self.segments.items() for seg in t]
        return Dataset.from_dict({"input_ids": [ids for _, ids in rows],
                                  "attention_mask": [[1] * len(ids) for _, ids in rows],
                                  "language": [lang for lang, _ in rows]})


def language_segments(tokenizer, corpus: Corpus, language: str, count: int, seqlen: int, seed: int,
                      prepend_bos: bool, split: str = "calibration", cache: TokenCache | None = None) -> torch.Tensor:
    """The first ``count`` segments of a language's seeded sample: segment i is the same whatever ``count`` is (the
    offsets come one after another from the language's own generator), so a larger sample extends a smaller one."""
    prefix = _prefix(tokenizer, prepend_bos)
    stream = language_stream(tokenizer, corpus, language, split, cache)
    need = seqlen - len(prefix)
    if count and stream.numel() < need:
        raise ValueError(
            f"language {language!r} has {stream.numel()} tokens of {split} text in corpus {corpus.name!r}, fewer "
            f"than one segment of {need}; lower model.seqlen or drop the language"
        )
    return sample_segments(stream, count, seqlen, language_seed(seed, language), prefix)


def build_calibration(tokenizer, corpus: Corpus, counts: Mapping[str, int], seqlen: int, seed: int,
                      prepend_bos: bool, split: str = "calibration", cache: TokenCache | None = None) -> CalibrationSet:
    return CalibrationSet({language: language_segments(tokenizer, corpus, language, count, seqlen, seed, prepend_bos,
                                                       split, cache) for language, count in counts.items()})


@dataclass
class SegmentSource:
    """Any number of each language's calibration segments, as :func:`build_calibration` samples them (what
    ``engine.mode=cached`` extends a language's cached statistics with), and the key of that sample."""

    tokenizer: object
    corpus: Corpus
    seqlen: int
    seed: int
    prepend_bos: bool
    cache: TokenCache | None = None

    def segments(self, language: str, count: int) -> torch.Tensor:
        return language_segments(self.tokenizer, self.corpus, language, count, self.seqlen, self.seed,
                                 self.prepend_bos, cache=self.cache)

    def key(self, language: str) -> dict:
        """Everything the language's sample depends on."""
        return {"stream": stream_key(self.tokenizer, self.corpus, language, "calibration"), "seqlen": self.seqlen,
                "seed": language_seed(self.seed, language), "prefix": _prefix(self.tokenizer, self.prepend_bos)}


def build_eval_windows(tokenizer, corpus: Corpus, languages: list[str], seqlen: int, prepend_bos: bool,
                       split: str = "evaluation", max_windows: int | None = None,
                       cache: TokenCache | None = None) -> dict[str, list[torch.Tensor]]:
    prefix = _prefix(tokenizer, prepend_bos)
    windows = {}
    for language in languages:
        windows[language] = eval_windows(language_stream(tokenizer, corpus, language, split, cache), seqlen, prefix,
                                         max_windows)
        if not windows[language]:
            raise ValueError(f"language {language!r} has no {split} text in corpus {corpus.name!r}")
    return windows


@dataclass
class CalibrationText:
    """How long calibration segments are, and how much text each language has against how much its segments draw:
    a small corpus (the UDHR gives a language 1-3k tokens) cannot fill many long segments without repeating itself."""

    seqlen: int  # tokens per calibration segment (prefix included)
    model_seqlen: int
    reason: str | None  # why seqlen is shorter than model.seqlen, or None
    available: dict[str, int]  # tokens of each language's calibration text
    requested: dict[str, int]  # tokens its segments draw (prefix excluded)

    @property
    def repeats(self) -> dict[str, float]:
        return {k: self.requested[k] / self.available[k] for k in self.requested if self.available.get(k)}

    def warning(self) -> str | None:
        """One line naming the languages whose segments repeat their text more than REPEAT_WARNING times."""
        over = sorted(((k, r) for k, r in self.repeats.items() if r > REPEAT_WARNING), key=lambda kr: -kr[1])
        if not over:
            return None
        named = ", ".join(f"{k} draws {self.requested[k]:,} tokens from {self.available[k]:,} (x{r:.1f})"
                          for k, r in over)
        return (f"calibration repeats its text: {named}; more than x{REPEAT_WARNING:g} means the same tokens many "
                "times over (fewer segments, shorter segments or a larger corpus repeat less)")

    def per_language(self, counts: Mapping[str, int]) -> str:
        """Per language: segments, tokens drawn of its text's tokens, and the repeat factor (the console line)."""
        return ", ".join(f"{k} {counts[k]} ({self.requested[k]:,}/{self.available[k]:,} x{self.repeats[k]:.1f})"
                         for k in self.requested if self.available.get(k))

    def check(self, limit: float = REPEAT_LIMIT) -> None:
        """Refuse a calibration that draws more than ``limit`` tokens per token of a language's text: its segments
        would be the same few windows over and over, not a sample of the language."""
        over = sorted(((k, r) for k, r in self.repeats.items() if r > limit), key=lambda kr: -kr[1])
        if over:
            named = ", ".join(f"{k} draws {self.requested[k]:,} tokens from {self.available[k]:,} (x{r:.1f})"
                              for k, r in over)
            raise ValueError(f"calibration would repeat its text more than calibration_max_repeats={limit:g} times: "
                             f"{named}; use fewer segments (sampler.segments), shorter ones (calibration_seqlen) or "
                             f"a larger corpus, or raise calibration_max_repeats")

    def record(self) -> dict:
        return {"seqlen": self.seqlen, "model_seqlen": self.model_seqlen, "seqlen_reason": self.reason,
                "text": {k: {"available": self.available[k], "requested": self.requested[k],
                             "repeats": round(self.repeats[k], 4)} for k in self.requested}}


def calibration_text(tokenizer, corpus: Corpus, counts: Mapping[str, int], model_seqlen: int, prepend_bos: bool,
                     fixed: int | None = None, also: Sequence[str] = (), cache: TokenCache | None = None
                     ) -> CalibrationText:
    """The segment length (``fixed``, else ``model_seqlen`` unless the shortest calibration text of the calibration
    languages and ``also`` (e.g. the similarity probe's) cannot hold one segment: then the largest power of two whose
    segment body is at most half that text, so segments can start at different places) and the text per language."""
    prefix = len(_prefix(tokenizer, prepend_bos))
    used = [k for k, v in counts.items() if v]
    available = {k: int(language_stream(tokenizer, corpus, k, "calibration", cache).numel())
                 for k in dict.fromkeys([*used, *also])}
    seqlen, reason = fixed or model_seqlen, None
    if fixed is not None and not MIN_SEQLEN <= fixed <= model_seqlen:
        raise ValueError(f"calibration_seqlen={fixed} must be in {MIN_SEQLEN}..{model_seqlen} (model.seqlen)")
    shortest = min(available, key=available.get) if available else None
    if fixed is None and shortest is not None and available[shortest] < model_seqlen - prefix:
        seqlen = MIN_SEQLEN
        while seqlen * 2 - prefix <= available[shortest] // 2 and seqlen * 2 <= model_seqlen:
            seqlen *= 2
        if seqlen - prefix > available[shortest]:
            raise ValueError(f"language {shortest!r} has {available[shortest]} tokens of calibration text in corpus "
                             f"{corpus.name!r}, too few for a segment of {MIN_SEQLEN}; drop the language")
        reason = (f"the shortest calibration text ({shortest}, {available[shortest]:,} tokens in {corpus.name}) holds "
                  f"no segment of model.seqlen={model_seqlen}; segments of {seqlen} tokens (at most half of it), "
                  f"evaluation windows stay {model_seqlen} (calibration_seqlen=N sets it)")
    requested = {k: counts[k] * (seqlen - prefix) for k in used}
    return CalibrationText(seqlen, model_seqlen, reason, available, requested)
