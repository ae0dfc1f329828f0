"""Where a model's training-language distribution comes from when its config does not carry one inline:
a user's TSV file, or an *estimate* from the tokenizer for models that publish none.

The estimate is not a published figure. It rests on one measurable observation: a tokenizer trained on a mixture
spends fewer tokens on text of the languages it saw more of. On the parallel UDHR (the same declaration in every
language) we count each language's tokens, divide by the fewest any language needs (its *premium*, >= 1; the
"tokenization premium" of Petrov et al., NeurIPS 2023), and take share ∝ premium^-sharpness. It needs only the
tokenizer, so it is computed before the model loads. Results record it as a proxy.
"""
from __future__ import annotations

import math
from pathlib import Path

from mbs.data.languages import LANGUAGES, get_language


def read_tsv(path: str | Path) -> dict[str, float]:
    """``code<TAB>share`` lines (our codes; ``#`` starts a comment; an optional ``iso<TAB>share`` header).

    Every malformed line fails with its line number; so do duplicate codes and shares that sum to zero."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ValueError(f"model.distribution_tsv={str(path)!r}: cannot read it ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"model.distribution_tsv={str(path)!r} is not UTF-8 text "
                         f"(byte {err.start}: {err.reason})") from None
    shares: dict[str, float] = {}
    last = 0
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split("\t")]
        where = f"{path}:{number}"
        if len(fields) != 2:
            raise ValueError(f"{where}: expected 'code<TAB>share', got {raw.strip()!r}")
        code, share = fields
        if not shares and code.lower() in ("iso", "code", "language") and share.lower() == "share":
            continue  # header
        if code not in LANGUAGES:
            try:
                get_language(code)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        try:
            value = float(share)
        except ValueError:
            raise ValueError(f"{where}: share {share!r} of {code} is not a number") from None
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{where}: share {share!r} of {code} must be a finite number >= 0")
        if code in shares:
            raise ValueError(f"{where}: {code} is given twice")
        shares[code] = value
        last = number
    if not shares:
        raise ValueError(f"{path}: no 'code<TAB>share' lines")
    if sum(shares.values()) <= 0:
        raise ValueError(f"{path}:{last}: shares sum to zero; give at least one language a positive share")
    return shares


def estimate_from_tokenizer(tokenizer, sharpness: float = 4.0, languages: list[str] | None = None) -> dict[str, float]:
    """ESTIMATED shares (percent) from the tokenizer's token premium on the parallel UDHR; see the module docstring."""
    from mbs.data.corpora import UDHRCorpus

    corpus = UDHRCorpus()
    codes = languages or corpus.languages()
    tokens = {}
    for code in codes:
        text = "\n\n".join(corpus.texts(code, "calibration") + corpus.texts(code, "evaluation"))
        tokens[code] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    best = min(tokens.values())
    weights = {code: (n / best) ** -sharpness for code, n in tokens.items()}
    mass = sum(weights.values())
    return {code: 100.0 * w / mass for code, w in weights.items()}
