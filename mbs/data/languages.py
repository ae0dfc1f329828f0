"""One code table for the languages MBS has sources for, and any other BCP-47 language for a user's own data.

Our codes are ISO 639-1 where one exists (ISO 639-3 otherwise), with a script subtag only where the script is what
distinguishes two varieties (``zh-Hans``/``zh-Hant``). Each corpus maps these codes to its own through the columns
of this table, so there is one place to add a language or a source. A valid BCP-47 tag outside the table (``yue``,
``gsw``, ``sr-Latn``) is a language too, with its name and likely script from ``langcodes`` and no hub source.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class Language:
    code: str
    name: str
    iso639_3: str
    script: str
    udhr: str | None = None  # file key in notofonttools' third_party/udhr (udhr_<key>.xml)
    flores: str | None = None  # FLORES-200 config (facebook/flores), e.g. swh_Latn
    cc100: str | None = None  # CC-100 language (statmt/cc100), e.g. sw, zh-Hans
    xlsum: str | None = None  # XL-Sum config (csebuetnlp/xlsum), e.g. swahili
    wikitext: str | None = None  # WikiText config (Salesforce/wikitext); English only


_TABLE: tuple[Language, ...] = (
    Language("en", "English", "eng", "Latn", "eng", flores="eng_Latn", cc100="en", xlsum="english", wikitext="wikitext-2-raw-v1"),
    Language("zh-Hans", "Chinese (Simplified)", "cmn", "Hans", "cmn_hans", flores="zho_Hans", cc100="zh-Hans", xlsum="chinese_simplified"),
    Language("zh-Hant", "Chinese (Traditional)", "cmn", "Hant", "cmn_hant", flores="zho_Hant", cc100="zh-Hant", xlsum="chinese_traditional"),
    Language("fr", "French", "fra", "Latn", "fra", flores="fra_Latn", cc100="fr", xlsum="french"),
    Language("es", "Spanish", "spa", "Latn", "spa", flores="spa_Latn", cc100="es", xlsum="spanish"),
    Language("pt", "Portuguese", "por", "Latn", "por_PT", flores="por_Latn", cc100="pt", xlsum="portuguese"),
    Language("ar", "Arabic", "arb", "Arab", "arb", flores="arb_Arab", cc100="ar", xlsum="arabic"),
    Language("vi", "Vietnamese", "vie", "Latn", "vie", flores="vie_Latn", cc100="vi", xlsum="vietnamese"),
    Language("id", "Indonesian", "ind", "Latn", "ind", flores="ind_Latn", cc100="id", xlsum="indonesian"),
    Language("ca", "Catalan", "cat", "Latn", "cat", flores="cat_Latn", cc100="ca", xlsum=None),
    Language("eu", "Basque", "eus", "Latn", "eus", flores="eus_Latn", cc100="eu", xlsum=None),
    Language("hi", "Hindi", "hin", "Deva", "hin", flores="hin_Deva", cc100="hi", xlsum="hindi"),
    Language("bn", "Bengali", "ben", "Beng", "ben", flores="ben_Beng", cc100="bn", xlsum="bengali"),
    Language("ta", "Tamil", "tam", "Taml", "tam", flores="tam_Taml", cc100="ta", xlsum="tamil"),
    Language("ur", "Urdu", "urd", "Arab", "urd", flores="urd_Arab", cc100="ur", xlsum="urdu"),
    Language("ml", "Malayalam", "mal", "Mlym", "mal", flores="mal_Mlym", cc100="ml", xlsum=None),
    Language("te", "Telugu", "tel", "Telu", "tel", flores="tel_Telu", cc100="te", xlsum="telugu"),
    Language("ne", "Nepali", "npi", "Deva", "nep", flores="npi_Deva", cc100="ne", xlsum="nepali"),
    Language("kn", "Kannada", "kan", "Knda", "kan", flores="kan_Knda", cc100="kn", xlsum=None),
    Language("pa", "Punjabi", "pan", "Guru", "pan", flores="pan_Guru", cc100="pa", xlsum="punjabi"),
    Language("mr", "Marathi", "mar", "Deva", "mar", flores="mar_Deva", cc100="mr", xlsum="marathi"),
    Language("gu", "Gujarati", "guj", "Gujr", "guj", flores="guj_Gujr", cc100="gu", xlsum="gujarati"),
    Language("or", "Odia", "ory", "Orya", None, flores="ory_Orya", cc100="or", xlsum=None),
    Language("as", "Assamese", "asm", "Beng", None, flores="asm_Beng", cc100="as", xlsum=None),
    Language("sw", "Swahili", "swh", "Latn", "swh", flores="swh_Latn", cc100="sw", xlsum="swahili"),
    Language("yo", "Yoruba", "yor", "Latn", "yor", flores="yor_Latn", cc100="yo", xlsum="yoruba"),
    Language("rw", "Kinyarwanda", "kin", "Latn", "kin", flores="kin_Latn", cc100=None, xlsum=None),
    Language("xh", "Xhosa", "xho", "Latn", "xho", flores="xho_Latn", cc100="xh", xlsum=None),
    Language("ig", "Igbo", "ibo", "Latn", "ibo", flores="ibo_Latn", cc100="ig", xlsum="igbo"),
    Language("zu", "Zulu", "zul", "Latn", "zul", flores="zul_Latn", cc100="zu", xlsum=None),
    Language("sn", "Shona", "sna", "Latn", "sna", flores="sna_Latn", cc100=None, xlsum=None),
    Language("lg", "Luganda", "lug", "Latn", "lug", flores="lug_Latn", cc100="lg", xlsum=None),
    Language("wo", "Wolof", "wol", "Latn", "wol", flores="wol_Latn", cc100="wo", xlsum=None),
    Language("rn", "Kirundi", "run", "Latn", "run", flores="run_Latn", cc100=None, xlsum="kirundi"),
    Language("fon", "Fon", "fon", "Latn", "fon", flores="fon_Latn", cc100=None, xlsum=None),
    Language("nso", "Northern Sotho", "nso", "Latn", "nso", flores="nso_Latn", cc100="ns", xlsum=None),
    Language("ln", "Lingala", "lin", "Latn", "lin", flores="lin_Latn", cc100="ln", xlsum=None),
    Language("tn", "Setswana", "tsn", "Latn", "tsn", flores="tsn_Latn", cc100="tn", xlsum=None),
    Language("ny", "Chichewa", "nya", "Latn", "nya_chechewa", flores="nya_Latn", cc100=None, xlsum=None),
    Language("st", "Sesotho", "sot", "Latn", "sot", flores="sot_Latn", cc100=None, xlsum=None),
    Language("ts", "Xitsonga", "tso", "Latn", "tso_MZ", flores="tso_Latn", cc100=None, xlsum=None),
    Language("ak", "Akan", "aka", "Latn", "aka_asante", flores="aka_Latn", cc100=None, xlsum=None),
    Language("bm", "Bambara", "bam", "Latn", "bam", flores="bam_Latn", cc100=None, xlsum=None),
    Language("ki", "Kikuyu", "kik", "Latn", None, flores="kik_Latn", cc100=None, xlsum=None),
    Language("tum", "Tumbuka", "tum", "Latn", None, flores="tum_Latn", cc100=None, xlsum=None),
    Language("de", "German", "deu", "Latn", "deu_1996", flores="deu_Latn", cc100="de", xlsum=None),
    Language("ru", "Russian", "rus", "Cyrl", "rus", flores="rus_Cyrl", cc100="ru", xlsum="russian"),
    Language("ja", "Japanese", "jpn", "Jpan", "jpn", flores="jpn_Jpan", cc100="ja", xlsum="japanese"),
    Language("ko", "Korean", "kor", "Kore", "kor", flores="kor_Hang", cc100="ko", xlsum="korean"),
    Language("it", "Italian", "ita", "Latn", "ita", flores="ita_Latn", cc100="it", xlsum=None),
    Language("tr", "Turkish", "tur", "Latn", "tur", flores="tur_Latn", cc100="tr", xlsum="turkish"),
    Language("pl", "Polish", "pol", "Latn", "pol", flores="pol_Latn", cc100="pl", xlsum=None),
    Language("nl", "Dutch", "nld", "Latn", "nld", flores="nld_Latn", cc100="nl", xlsum=None),
    Language("th", "Thai", "tha", "Thai", "tha", flores="tha_Thai", cc100="th", xlsum="thai"),
    Language("fa", "Persian", "pes", "Arab", "pes_1", flores="pes_Arab", cc100="fa", xlsum="persian"),
    Language("uk", "Ukrainian", "ukr", "Cyrl", "ukr", flores="ukr_Cyrl", cc100="uk", xlsum="ukrainian"),
    Language("el", "Greek", "ell", "Grek", "ell_monotonic", flores="ell_Grek", cc100="el", xlsum=None),
    Language("he", "Hebrew", "heb", "Hebr", "heb", flores="heb_Hebr", cc100="he", xlsum=None),
    Language("am", "Amharic", "amh", "Ethi", "amh", flores="amh_Ethi", cc100="am", xlsum="amharic"),
    Language("ha", "Hausa", "hau", "Latn", "hau_NG", flores="hau_Latn", cc100="ha", xlsum="hausa"),
    Language("so", "Somali", "som", "Latn", "som", flores="som_Latn", cc100="so", xlsum="somali"),
)

LANGUAGES: dict[str, Language] = {lang.code: lang for lang in _TABLE}

# The 20 languages of the MBS paper's BLOOM experiments (arXiv 2404.04748), in the paper's order.
PAPER_LANGUAGES: tuple[str, ...] = (
    "en", "zh-Hans", "fr", "es", "pt", "ar", "vi", "hi", "id", "bn",
    "ta", "te", "ur", "ne", "mr", "gu", "zh-Hant", "sw", "yo", "ig",
)


NOT_LANGUAGES = ("und", "mul", "mis", "zxx")  # valid BCP-47 tags that name no one language


def get_language(code: str) -> Language:
    """The table row for ``code``; for another valid BCP-47 tag in its canonical form, a row from ``langcodes``
    (name, ISO 639-3, likely script; no hub source); else a one-line error saying what is wrong."""
    if not isinstance(code, str):
        raise ValueError(f"language code {code!r} is a {type(code).__name__}, not a string such as 'sw'")
    if code in LANGUAGES:
        return LANGUAGES[code]
    return _bcp47(code)


@functools.lru_cache(maxsize=None)
def _bcp47(code: str) -> Language:
    import langcodes

    example = "e.g. sw, yue, zh-Hant, sr-Latn"
    try:
        valid = langcodes.tag_is_valid(code) and not code.lower().startswith("x-")
    except (ValueError, langcodes.LanguageTagError):
        valid = False
    if not valid or code.split("-")[0].lower() in NOT_LANGUAGES:
        raise ValueError(f"unknown language code {code!r}: not a BCP-47 language tag ({example})")
    canonical = langcodes.standardize_tag(code)
    if canonical != code:
        raise ValueError(f"language code {code!r}: write it as {canonical!r} (the canonical BCP-47 form MBS keys by)")
    tag = langcodes.Language.get(code)
    try:
        name = tag.display_name()
    except ImportError:  # names come from the language_data package
        name = code
    try:
        iso639_3 = tag.to_alpha3()
    except LookupError:
        iso639_3 = tag.language or code
    return Language(code, name, iso639_3, tag.maximize().script or "Zyyy")


def check_languages(codes: list[str] | tuple[str, ...], what: str = "language") -> list[str]:
    """Validate a list of codes (known, no duplicates) and return it as a list."""
    codes = list(codes)
    for code in codes:
        get_language(code)
    dupes = sorted({c for c in codes if codes.count(c) > 1})
    if dupes:
        raise ValueError(f"{what} list repeats {', '.join(dupes)}; give each language once")
    return codes


# Columns derived from the FLORES-200 codes (ISO 639-3 + script, the convention both sources follow), with the
# exceptions each source documents:
# - flores_plus: openlanguagedata/flores_plus renamed Chinese to Mandarin (cmn_Hans, cmn_Hant; its CHANGELOG.md) and
#   split FLORES-200's aka_Latn into Twi varieties with glottocode suffixes, so Akan is left out rather than guessed.
# - fineweb2: HuggingFaceFW/fineweb-2 subsets are GlotLID labels (huggingface/fineweb-2 configs/<code>.yml): Chinese is
#   one cmn_Hani subset (both scripts; mapped to zh-Hans), Persian fas_Arab, Akan twi_Latn; no English (FineWeb's).
DERIVED_COLUMNS: dict[str, dict[str, str | None]] = {
    "flores_plus": {"zh-Hans": "cmn_Hans", "zh-Hant": "cmn_Hant", "ak": None},
    "fineweb2": {"en": None, "zh-Hans": "cmn_Hani", "zh-Hant": None, "fa": "fas_Arab", "ak": "twi_Latn"},
}
SOURCE_COLUMNS: tuple[str, ...] = ("udhr", "flores", "cc100", "xlsum", "wikitext", *DERIVED_COLUMNS)


def source_code(code: str, column: str) -> str | None:
    """Our code's name in one source (a column of the table), or None where the source lacks the language."""
    if column not in SOURCE_COLUMNS:
        raise ValueError(f"unknown source column {column!r}; the code table has: {', '.join(SOURCE_COLUMNS)}")
    if column in DERIVED_COLUMNS:
        exceptions = DERIVED_COLUMNS[column]
        return exceptions[code] if code in exceptions else get_language(code).flores
    return getattr(get_language(code), column)


def codes_in(column: str) -> list[str]:
    """Our codes for every language the source of ``column`` has, in table order."""
    return [c for c in LANGUAGES if source_code(c, column)]


def from_source(column: str, name: str) -> str:
    """Our code for a source's language name (the inverse of :func:`source_code`)."""
    for code in codes_in(column):
        if source_code(code, column) == name:
            return code
    raise ValueError(f"{column} language {name!r} is not in the code table")
