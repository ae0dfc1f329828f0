"""One code table for every language MBS knows.

Our codes are ISO 639-1 where one exists (ISO 639-3 otherwise), with a script subtag only where the script is what
distinguishes two varieties (``zh-Hans``/``zh-Hant``). Each corpus maps these codes to its own through the columns
of this table, so there is one place to add a language or a source.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Language:
    code: str
    name: str
    iso639_3: str
    script: str
    udhr: str | None = None  # file key in notofonttools' third_party/udhr (udhr_<key>.xml)


_TABLE: tuple[Language, ...] = (
    Language("en", "English", "eng", "Latn", "eng"),
    Language("zh-Hans", "Chinese (Simplified)", "cmn", "Hans", "cmn_hans"),
    Language("zh-Hant", "Chinese (Traditional)", "cmn", "Hant", "cmn_hant"),
    Language("fr", "French", "fra", "Latn", "fra"),
    Language("es", "Spanish", "spa", "Latn", "spa"),
    Language("pt", "Portuguese", "por", "Latn", "por_PT"),
    Language("ar", "Arabic", "arb", "Arab", "arb"),
    Language("vi", "Vietnamese", "vie", "Latn", "vie"),
    Language("id", "Indonesian", "ind", "Latn", "ind"),
    Language("ca", "Catalan", "cat", "Latn", "cat"),
    Language("eu", "Basque", "eus", "Latn", "eus"),
    Language("hi", "Hindi", "hin", "Deva", "hin"),
    Language("bn", "Bengali", "ben", "Beng", "ben"),
    Language("ta", "Tamil", "tam", "Taml", "tam"),
    Language("ur", "Urdu", "urd", "Arab", "urd"),
    Language("ml", "Malayalam", "mal", "Mlym", "mal"),
    Language("te", "Telugu", "tel", "Telu", "tel"),
    Language("ne", "Nepali", "npi", "Deva", "nep"),
    Language("kn", "Kannada", "kan", "Knda", "kan"),
    Language("pa", "Punjabi", "pan", "Guru", "pan"),
    Language("mr", "Marathi", "mar", "Deva", "mar"),
    Language("gu", "Gujarati", "guj", "Gujr", "guj"),
    Language("or", "Odia", "ory", "Orya"),
    Language("as", "Assamese", "asm", "Beng"),
    Language("sw", "Swahili", "swh", "Latn", "swh"),
    Language("yo", "Yoruba", "yor", "Latn", "yor"),
    Language("rw", "Kinyarwanda", "kin", "Latn", "kin"),
    Language("xh", "Xhosa", "xho", "Latn", "xho"),
    Language("ig", "Igbo", "ibo", "Latn", "ibo"),
    Language("zu", "Zulu", "zul", "Latn", "zul"),
    Language("sn", "Shona", "sna", "Latn", "sna"),
    Language("lg", "Luganda", "lug", "Latn", "lug"),
    Language("wo", "Wolof", "wol", "Latn", "wol"),
    Language("rn", "Kirundi", "run", "Latn", "run"),
    Language("fon", "Fon", "fon", "Latn", "fon"),
    Language("nso", "Northern Sotho", "nso", "Latn", "nso"),
    Language("ln", "Lingala", "lin", "Latn", "lin"),
    Language("tn", "Setswana", "tsn", "Latn", "tsn"),
    Language("ny", "Chichewa", "nya", "Latn", "nya_chechewa"),
    Language("st", "Sesotho", "sot", "Latn", "sot"),
    Language("ts", "Xitsonga", "tso", "Latn", "tso_MZ"),
    Language("ak", "Akan", "aka", "Latn", "aka_asante"),
    Language("bm", "Bambara", "bam", "Latn", "bam"),
    Language("ki", "Kikuyu", "kik", "Latn"),
    Language("tum", "Tumbuka", "tum", "Latn"),
    Language("de", "German", "deu", "Latn", "deu_1996"),
    Language("ru", "Russian", "rus", "Cyrl", "rus"),
    Language("ja", "Japanese", "jpn", "Jpan", "jpn"),
    Language("ko", "Korean", "kor", "Kore", "kor"),
    Language("it", "Italian", "ita", "Latn", "ita"),
    Language("tr", "Turkish", "tur", "Latn", "tur"),
    Language("pl", "Polish", "pol", "Latn", "pol"),
    Language("nl", "Dutch", "nld", "Latn", "nld"),
    Language("th", "Thai", "tha", "Thai", "tha"),
    Language("fa", "Persian", "pes", "Arab", "pes_1"),
    Language("uk", "Ukrainian", "ukr", "Cyrl", "ukr"),
    Language("el", "Greek", "ell", "Grek", "ell_monotonic"),
    Language("he", "Hebrew", "heb", "Hebr", "heb"),
    Language("am", "Amharic", "amh", "Ethi", "amh"),
    Language("ha", "Hausa", "hau", "Latn", "hau_NG"),
    Language("so", "Somali", "som", "Latn", "som"),
)

LANGUAGES: dict[str, Language] = {lang.code: lang for lang in _TABLE}

# The 20 languages of the MBS paper's BLOOM experiments (arXiv 2404.04748), in the paper's order.
PAPER_LANGUAGES: tuple[str, ...] = (
    "en", "zh-Hans", "fr", "es", "pt", "ar", "vi", "hi", "id", "bn",
    "ta", "te", "ur", "ne", "mr", "gu", "zh-Hant", "sw", "yo", "ig",
)


def get_language(code: str) -> Language:
    """The table row for ``code``, or a one-line error that lists the codes that exist."""
    try:
        return LANGUAGES[code]
    except KeyError:
        raise ValueError(f"unknown language code {code!r}; known codes: {', '.join(sorted(LANGUAGES))}") from None


def check_languages(codes: list[str] | tuple[str, ...], what: str = "language") -> list[str]:
    """Validate a list of codes (known, no duplicates) and return it as a list."""
    codes = list(codes)
    for code in codes:
        get_language(code)
    dupes = sorted({c for c in codes if codes.count(c) > 1})
    if dupes:
        raise ValueError(f"{what} list repeats {', '.join(dupes)}; give each language once")
    return codes
