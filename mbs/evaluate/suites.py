"""Multilingual zero-shot suites of lm-evaluation-harness, restricted to a run's evaluated languages (``eval.suites``,
the ``zeroshot=<suite>`` presets): each suite maps an MBS language code (mbs/data/languages.py) to its own variant
key, and the key to the harness's task names. The variant keys are those of lm-evaluation-harness 0.4.13 (a test
checks every one of them against the installed harness's task registry); a language the suite has no variant for is
named in one line, never silently dropped. The data of every suite is on the hub (``zeroshot=udhr`` is the offline
task), so a run needs hub access or a populated datasets cache (mbs/evaluate/task_data.py checks before the model
loads).

Variant choices: Global-MMLU is the full set (``global_mmlu_full_<code>``, 42 languages; the harness's
``global_mmlu_<code>`` is the 15-language Lite set); INCLUDE is its 0-shot ``include_base_44_<language>``; Global
PIQA is the non-parallel split in cloze form (log-likelihoods: for base models; the parallel split and the
generation form are other tasks), with France French, Spain Spanish and European Portuguese (UDHR's Portuguese is
``por_PT``) where it has regional varieties; MGSM is ``mgsm_direct_<code>`` (generation, exact match); Okapi is its
ARC, HellaSwag, MMLU and TruthfulQA (mc2) translations; PAWS-X (in ``zeroshot=paper``) is
one too. ``zh-Hans`` is each two-letter suite's ``zh`` (Simplified);
``zh-Hant`` has a variant only in Belebele and Global PIQA. INCLUDE's one Chinese set is mapped to ``zh-Hans``.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mbs.data.languages import Language, get_language

log = logging.getLogger(__name__)


def _two_letter(special: dict[str, str] | None = None) -> Callable[[Language], str]:
    table = {"zh-Hans": "zh", **(special or {})}
    return lambda lang: table.get(lang.code, lang.code)


def _flores(lang: Language) -> str:
    return lang.flores or f"{lang.iso639_3}_{lang.script}"


_PIQA_REGIONS = {"fr": "_fran", "es": "_spai", "pt": "_port"}


def _piqa(lang: Language) -> str:
    return f"{lang.iso639_3}_{lang.script.lower()}{_PIQA_REGIONS.get(lang.code, '')}"


def _include(lang: Language) -> str:
    return {"zh-Hans": "chinese"}.get(lang.code, lang.name.lower())


@dataclass(frozen=True)
class Family:
    """One task family of a suite: its task-name template and the variant keys the harness has."""
    template: str
    keys: frozenset[str]

    def task(self, key: str) -> str | None:
        return self.template.format(key) if key in self.keys else None


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    key: Callable[[Language], str]  # MBS language -> the suite's variant key
    families: tuple[Family, ...]

    def tasks(self, language: str) -> list[str]:
        key = self.key(get_language(language))
        return [t for f in self.families if (t := f.task(key)) is not None]


def _keys(text: str) -> frozenset[str]:
    return frozenset(text.split())


_OKAPI = ("ar bn ca da de es eu fr gu hi hr hu hy id it kn ml mr ne nl pt ro ru sk sr sv ta te uk vi")
SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("belebele", "Belebele (reading comprehension, 4 choices)", _flores, (Family("belebele_{}", _keys(
        "acm_Arab afr_Latn als_Latn amh_Ethi apc_Arab arb_Arab arb_Latn ars_Arab ary_Arab arz_Arab asm_Beng azj_Latn "
        "bam_Latn ben_Beng ben_Latn bod_Tibt bul_Cyrl cat_Latn ceb_Latn ces_Latn ckb_Arab dan_Latn deu_Latn ell_Grek "
        "eng_Latn est_Latn eus_Latn fin_Latn fra_Latn fuv_Latn gaz_Latn glg_Latn grn_Latn guj_Gujr hat_Latn hau_Latn "
        "heb_Hebr hin_Deva hin_Latn hrv_Latn hun_Latn hye_Armn ibo_Latn ilo_Latn ind_Latn isl_Latn ita_Latn jav_Latn "
        "jpn_Jpan kac_Latn kan_Knda kat_Geor kaz_Cyrl kea_Latn khk_Cyrl khm_Khmr kin_Latn kir_Cyrl kor_Hang lao_Laoo "
        "lin_Latn lit_Latn lug_Latn luo_Latn lvs_Latn mal_Mlym mar_Deva mkd_Cyrl mlt_Latn mri_Latn mya_Mymr nld_Latn "
        "nob_Latn npi_Deva npi_Latn nso_Latn nya_Latn ory_Orya pan_Guru pbt_Arab pes_Arab plt_Latn pol_Latn por_Latn "
        "ron_Latn rus_Cyrl shn_Mymr sin_Latn sin_Sinh slk_Latn slv_Latn sna_Latn snd_Arab som_Latn sot_Latn spa_Latn "
        "srp_Cyrl ssw_Latn sun_Latn swe_Latn swh_Latn tam_Taml tel_Telu tgk_Cyrl tgl_Latn tha_Thai tir_Ethi tsn_Latn "
        "tso_Latn tur_Latn ukr_Cyrl urd_Arab urd_Latn uzn_Latn vie_Latn war_Latn wol_Latn xho_Latn yor_Latn zho_Hans "
        "zho_Hant zsm_Latn zul_Latn")),)),
    Suite("global-mmlu", "Global-MMLU (full, 4 choices)", _two_letter(), (Family("global_mmlu_full_{}", _keys(
        "am ar bn cs de el en es fa fil fr ha he hi id ig it ja ko ky lt mg ms ne nl ny pl pt ro ru si sn so sr sv sw "
        "te tr uk vi yo zh")),)),
    Suite("include", "INCLUDE (regional exams, 4 choices)", _include, (Family("include_base_44_{}", _keys(
        "albanian arabic armenian azerbaijani basque belarusian bengali bulgarian chinese croatian dutch estonian "
        "finnish french georgian german greek hebrew hindi hungarian indonesian italian japanese kazakh korean "
        "lithuanian malay malayalam nepali persian polish portuguese russian serbian spanish tagalog tamil telugu "
        "turkish ukrainian urdu uzbek vietnamese")),)),
    Suite("global-piqa", "Global PIQA (non-parallel, cloze, 2 choices)", _piqa, (Family(
        "global_piqa_nonparallel_cloze_{}", _keys(
            "acm_arab acq_arab aeb_arab afb_arab als_latn amh_ethi apc_arab_jord apc_arab_leba apc_arab_pale "
            "apc_arab_syri arb_arab arq_arab ars_arab ary_arab arz_arab asm_beng azj_latn bam_latn bcc_arab bel_cyrl "
            "ben_beng ben_latn bgc_deva bho_deva bos_latn bra_deva bsk_arab btx_latn bul_cyrl cat_latn ces_latn "
            "ckb_arab ckm_latn cls_deva cmn_hans cmn_hant dan_latn deu_latn dhd_deva dje_latn ekk_latn ekp_latn "
            "ell_grek eng_latn eus_latn fao_latn fin_latn fra_latn_cana fra_latn_fran glg_latn guj_gujr hau_latn "
            "haw_latn heb_hebr hin_deva hin_latn hrv_latn hun_latn hye_armn ibo_latn idu_latn ind_latn isl_latn "
            "iso_latn ita_latn jav_latn jpn_jpan kan_knda kan_latn kat_geor kaz_cyrl kin_latn kir_cyrl kor_hang "
            "lin_latn lit_latn luo_latn mal_mlym mar_deva mkd_cyrl mni_beng mni_mtei nag_latn nld_latn nno_latn "
            "nob_latn npi_deva ory_orya pan_guru pcm_latn pes_arab plt_latn pol_latn por_latn_braz por_latn_port "
            "ron_latn rus_cyrl rwr_deva sin_latn sin_sinh slk_latn slk_latn_sari slv_latn slv_latn_cerk "
            "slv_latn_prle snd_arab snd_deva spa_latn_mexi spa_latn_peru spa_latn_spai srp_cyrl srp_cyrl_torl "
            "srp_latn srp_latn_torl sun_latn swe_latn swh_latn swv_deva tam_latn tam_taml tel_latn tel_telu tgl_latn "
            "tha_thai tur_latn uig_arab ukr_cyrl urd_arab urd_latn urh_latn uzn_latn vie_latn yor_latn yue_hant "
            "zsm_latn zul_latn")),)),
    Suite("mgsm", "MGSM (grade-school maths, generation, exact match)", _two_letter(), (Family(
        "mgsm_direct_{}", _keys("bn ca de en es eu fr gl ja ru sw te th zh")),)),
    Suite("xnli", "XNLI (3-way NLI as a cloze)", _two_letter(), (Family(
        "xnli_{}", _keys("ar bg ca de el en es eu fr gl hi ru sw th tr ur va vi zh")),)),
    Suite("xcopa", "XCOPA (cause/effect, 2 choices)", _two_letter(), (Family(
        "xcopa_{}", _keys("et eu ht id it qu sw ta th tr vi zh")),)),
    Suite("xstorycloze", "XStoryCloze (story ending, 2 choices)", _two_letter(), (Family(
        "xstorycloze_{}", _keys("ar ca en es eu gl hi id my ru sw te zh")),)),
    Suite("paws-x", "PAWS-X (paraphrase or not, 2 choices)", _two_letter(), (Family(
        "paws_{}", _keys("ca de en es eu fr gl ja ko zh")),)),
    Suite("xwinograd", "XWinograd (coreference, 2 choices)", _two_letter({"ja": "jp"}), (Family(
        "xwinograd_{}", _keys("en fr jp pt ru zh")),)),
    Suite("okapi", "Okapi (ARC, HellaSwag, MMLU, TruthfulQA mc2; machine-translated)", _two_letter(), (
        Family("arc_{}", _keys(_OKAPI + " zh")),
        Family("hellaswag_{}", _keys(_OKAPI)),
        Family("m_mmlu_{}", _keys(_OKAPI + " en is nb zh")),
        Family("truthfulqa_{}_mc2", _keys(_OKAPI + " gl zh")))),
)}


def check_suites(suites: Iterable[str], languages: list[str]) -> None:
    """One-line ValueError for an unknown or repeated suite, or one with no variant in any evaluated language."""
    suites = list(suites)
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"eval.suites: unknown suite(s) {', '.join(map(repr, unknown))}; allowed: "
                         f"{', '.join(SUITES)}")
    repeated = sorted({s for s in suites if suites.count(s) > 1})
    if repeated:
        raise ValueError(f"eval.suites repeats {', '.join(repeated)}; give each suite once")
    for name in suites:
        if not any(SUITES[name].tasks(lang) for lang in languages):
            raise ValueError(f"eval.suites: {name} has no variant in any evaluated language "
                             f"({', '.join(languages)}); drop it or evaluate one of its languages")


def missing(suite: str, languages: list[str]) -> dict[str, list[str]]:
    """Per task family of ``suite`` (its template), the evaluated languages it has no variant for."""
    s = SUITES[suite]
    return {f.template: [lang for lang in languages if f.task(s.key(get_language(lang))) is None]
            for f in s.families}


def missing_line(suite: str, languages: list[str]) -> str | None:
    """The one line naming the evaluated languages ``suite`` has no variant for (None when it covers them all)."""
    gaps = missing(suite, languages)
    none_at_all = [lang for lang in languages if all(lang in g for g in gaps.values())]
    partial = {t: [lang for lang in g if lang not in none_at_all] for t, g in gaps.items()}
    partial = {t: g for t, g in partial.items() if g}
    if not none_at_all and not partial:
        return None
    parts = [f"no variant for {', '.join(none_at_all)}"] if none_at_all else []
    parts += [f"no {t.format('<code>')} for {', '.join(g)}" for t, g in partial.items()]
    return f"zero-shot suite {suite}: {'; '.join(parts)}; those are left out of its tasks"


def suite_tasks(suites: Iterable[str], languages: list[str]) -> list[str]:
    """The harness task names of ``suites`` for ``languages``, in language order per suite."""
    return [t for name in suites for lang in languages for t in SUITES[name].tasks(lang)]


def resolve_tasks(tasks: list[str], suites: list[str], languages: list[str], warn: bool = True) -> list[str]:
    """``eval.tasks`` followed by the suites' tasks for the evaluated languages (a task named twice runs once);
    ``warn``: log, per suite, the one line naming the languages it has no variant for."""
    check_suites(suites, languages)
    if warn:
        for name in suites:
            line = missing_line(name, languages)
            if line:
                log.warning(line)
    return list(dict.fromkeys([*tasks, *suite_tasks(suites, languages)]))


@functools.cache
def _task_languages() -> dict[str, str]:
    from mbs.data.languages import LANGUAGES

    return {task: code for suite in SUITES.values() for code in LANGUAGES for task in suite.tasks(code)}


def task_language(task: str) -> str | None:
    """The MBS language code a suite task (or ``udhr_mc_<code>``) is in, for the per-language view of accuracy;
    None for a task of no one language (a group, or a task of no suite here). Over the codes of
    mbs/data/languages.py."""
    if task.startswith("udhr_mc_"):
        return task.removeprefix("udhr_mc_")
    return _task_languages().get(task)
